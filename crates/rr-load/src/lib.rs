//! rr-load
