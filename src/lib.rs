//! runnel
