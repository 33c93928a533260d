//! Host tests of the volume layer: the whole path from console tasks and volume requests
//! through the engines to the devices, over `RamDisk`s wrapped in a crash model
//! ([`harness::Disk`]) and drivers' `FakeDma`.

mod crash;
mod discovery;
mod harness;
mod io;
mod tasks;
