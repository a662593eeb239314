//! A stand-in for a member cluster's kube-apiserver, for Tower's tests and benchmarks.

pub mod command;
