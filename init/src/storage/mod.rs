//! The disk: finding partitions by name, device-mapper (dm-verity for the root), and the
//! STATE partition, which is grown to fill the disk on first boot and then mounted.

pub mod dm;
pub mod grow;
pub mod partition;
pub mod state;
