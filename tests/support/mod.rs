//! Shared integration-test support: a throwaway SPIFFE PKI and an in-test Loki push receiver.
//! Each test binary uses a different part of it, hence the `dead_code` allowance in both.

pub mod http_target;
pub mod journald;
pub mod kube;
pub mod pki;
pub mod receiver;
pub mod spire;
pub mod store;
pub mod workload_api;
pub mod ztail;
