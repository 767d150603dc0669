//! What survives a restart of the daemon: [`holder`], a small process of its own that
//! keeps the daemon's FUSE connections and listening sockets open while no daemon runs,
//! and hands them back to the next one.

pub mod holder;
