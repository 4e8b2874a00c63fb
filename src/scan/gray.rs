//! The decoded image every format is turned into.

/// A decoded single-channel image.
///
/// Row-major, `width * height` values, in display polarity (higher is brighter: lungs dark,
/// bones bright) at the source's native scale: 0–255 for 8-bit rasters, 0–65535 for 16-bit,
/// VOI output (0–1 after a window, LUT units after a VOI LUT) or modality units for DICOM.
/// The absolute scale is deliberately left alone; [`preprocess`] normalises it away.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Pixel values, row-major.
    pub data: Vec<f32>,
}
