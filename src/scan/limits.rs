//! Resource limits, checked before any pixel buffer is allocated.
//!
//! Scans come from the network, so a decompression bomb must cost a header
//! parse, never its claimed size: the byte length is checked first, then the
//! pixel count read from the header.

use super::error::{corrupt, LimitKind, ScanError};

/// Default cap on the encoded size of one scan. A 1024² 8-bit PNG is about 1 MB and an
/// uncompressed 16-bit 3000² DICOM about 18 MB; 64 MiB leaves room for large detectors.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Default cap on decoded pixels. The largest flat-panel detectors are around 43 cm at
/// 0.1 mm pitch (≈ 4300² ≈ 18.5 MP); 60 MP is generous while still bounding memory.
pub const DEFAULT_MAX_PIXELS: u64 = 60_000_000;

/// Resource limits applied to every scan before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest accepted encoded input, in bytes.
    pub max_bytes: usize,
    /// Largest accepted image, in pixels (width × height), read from the header.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

pub(super) fn check_pixels(width: u64, height: u64, limits: &Limits) -> Result<(), ScanError> {
    if width == 0 || height == 0 {
        return Err(corrupt("zero-sized image"));
    }
    let pixels = width.saturating_mul(height);
    if pixels > limits.max_pixels {
        return Err(ScanError::TooLarge {
            limit: LimitKind::Pixels,
            actual: Some(pixels),
            max: limits.max_pixels,
        });
    }
    Ok(())
}
