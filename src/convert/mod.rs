//! `ztail convert`: taking over from another shipper.

pub mod positions;
pub mod promtail;
