//! A TCP relay a test can freeze, for dead links and load balancers.

use std::net::SocketAddr;
use std::sync::Arc;

/// A TCP relay on loopback: a round-robin load balancer over its targets, which the test
/// can also freeze. A frozen connection moves no more bytes in either direction and
/// closes nothing, like a blackholed link or a load balancer that silently dropped the
/// flow. Connections made later flow normally.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    connections: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    targets: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl Relay {
    /// Relays every connection to `target`.
    pub fn start(target: SocketAddr) -> Self {
        Self::balance(&[target])
    }

    /// Spreads connections over `targets`, round robin.
    pub fn balance(targets: &[SocketAddr]) -> Self {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let connections: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> =
            Arc::default();
        let registry = connections.clone();
        let targets = Arc::new(std::sync::Mutex::new(targets.to_vec()));
        let choices = targets.clone();
        std::thread::spawn(move || {
            let mut next = 0usize;
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let target = {
                    let choices = choices.lock().expect("lock");
                    if choices.is_empty() {
                        continue;
                    }
                    next = next.wrapping_add(1);
                    choices[next % choices.len()]
                };
                let Ok(upstream) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                registry.lock().expect("lock").push(frozen.clone());
                let pairs = [
                    (
                        client.try_clone().expect("clone"),
                        upstream.try_clone().expect("clone"),
                    ),
                    (upstream, client),
                ];
                for (mut from, mut to) in pairs {
                    let frozen = frozen.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                            if frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                // Swallow everything, answer nothing, close nothing (the
                                // socket stays open while the other direction's thread
                                // holds it).
                                if n == 0 {
                                    break;
                                }
                                continue;
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                break;
                            }
                        }
                    });
                }
            }
        });
        Relay {
            addr,
            connections,
            targets,
        }
    }

    /// Replaces the targets (as a load balancer's health checks would).
    pub fn set_targets(&self, targets: &[SocketAddr]) {
        *self.targets.lock().expect("lock") = targets.to_vec();
    }

    /// Freezes every connection open now.
    pub fn freeze(&self) {
        for frozen in self.connections.lock().expect("lock").iter() {
            frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
