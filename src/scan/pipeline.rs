//! The scan path, end to end: bytes in, model input out.

use super::dicom::decode_dicom;
use super::error::LimitKind;
use super::error::ScanError;
use super::format::{detect_format, ImageFormat};
use super::gray::GrayImage;
use super::limits::Limits;
use super::raster::{decode_jpeg, decode_png};
use super::resize::preprocess;

/// Decodes a PNG, JPEG or DICOM scan into a display-polarity gray image.
///
/// The byte limit is checked first, then the pixel limit against the header's dimensions,
/// both before the pixel data is decoded. See [`GrayImage`] for the value scale.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<GrayImage, ScanError> {
    if bytes.is_empty() {
        return Err(ScanError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ScanError::TooLarge {
            limit: LimitKind::Bytes,
            actual: Some(bytes.len() as u64),
            max: limits.max_bytes as u64,
        });
    }
    match detect_format(bytes).ok_or(ScanError::UnsupportedFormat)? {
        ImageFormat::Png => decode_png(bytes, limits),
        ImageFormat::Jpeg => decode_jpeg(bytes, limits),
        ImageFormat::Dicom => decode_dicom(bytes, limits),
    }
}

/// Decodes and preprocesses one scan: the single entry point for training and serving.
pub fn load_scan(bytes: &[u8], limits: &Limits, size: u32) -> Result<Vec<f32>, ScanError> {
    load_scan_timed(bytes, limits, size).map(|(input, _)| input)
}

/// Where [`load_scan_timed`] spent its time, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadTimes {
    /// Bytes to gray pixels (PNG, JPEG or DICOM decoding).
    pub decode_ms: f64,
    /// Gray pixels to model input (resize and min-max normalisation).
    pub preprocess_ms: f64,
}

/// [`load_scan`], timing its two stages (what the fleet reports per stage).
pub fn load_scan_timed(
    bytes: &[u8],
    limits: &Limits,
    size: u32,
) -> Result<(Vec<f32>, LoadTimes), ScanError> {
    if size == 0 {
        // Fail before the (possibly expensive) decode on a caller bug.
        return Err(ScanError::InvalidSize(size));
    }
    let t0 = std::time::Instant::now();
    let image = decode(bytes, limits)?;
    let t1 = std::time::Instant::now();
    let input = preprocess(&image, size)?;
    let times = LoadTimes {
        decode_ms: (t1 - t0).as_secs_f64() * 1e3,
        preprocess_ms: t1.elapsed().as_secs_f64() * 1e3,
    };
    Ok((input, times))
}
