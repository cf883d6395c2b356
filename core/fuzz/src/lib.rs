//! Support code of the ivcom-core fuzz targets.

pub mod script;
pub mod targets;
