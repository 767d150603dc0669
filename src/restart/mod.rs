//! What survives a restart of the daemon: [`holder`], a small process of its own that
//! keeps the daemon's FUSE connections and listening sockets open while no daemon runs,
//! and hands them back to the next one; [`handover`], the daemon's side of it (what it
//! takes at start, keeps while it runs, and lets go of when it stops for good).

pub mod handover;
pub mod holder;
