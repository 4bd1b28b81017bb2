//! Loki's push protocol: labels, body encoding (pure), and the client that sends batches with
//! retries over mutual TLS (I/O).

pub mod client;
pub mod config;
pub mod encode;
pub mod labels;
