//! Shared by the benchmark harnesses.

pub mod receiver;
