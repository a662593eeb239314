//! The operator's subcommands besides `serve` (whose flags are [`crate::cli`]'s): each
//! one's flags and what it prints, returned as text for the binary to print, or the
//! reason it refused (bad usage or configuration).

pub mod agent_manifest;
pub mod clusters;
pub mod kubeconfig;
pub mod tokens;
