//! What the fuzz targets share with keygate's property tests.

pub mod envoy_oracle;
