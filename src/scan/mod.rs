//! Scans: request bytes in, model input out.
//!
//! The model is only as good as the agreement between the tensors it was trained on and the
//! tensors it is served. Every decision that shapes those tensors (luminance weights, DICOM
//! LUT order, MONOCHROME1 inversion, resize filter, normalisation) therefore lives here exactly
//! once, and both the trainer and the fleet call [`load_scan`].
//!
//! Pipeline:
//! 1. [`detect_format`] from magic bytes (never the file name: uploads are routinely misnamed).
//! 2. Limits, cheapest first: byte length, then the pixel count from the image header, both
//!    before any pixel buffer is allocated, so a decompression bomb costs a header parse.
//! 3. [`decode`] to a display-polarity `f32` gray image ([`GrayImage`]): higher is brighter,
//!    lungs dark, bones bright, at the source's native scale (no 8-bit squashing).
//! 4. [`preprocess`]: resize to `size`×`size` with a bilinear *convolution* (a real low-pass
//!    filter when downsampling, unlike point sampling), then min-max normalise to `[0, 1]`.
//!    Min-max rather than `/255` keeps 8-bit, 16-bit and DICOM inputs on one scale.
//!
//! Scans come from the network, so this module treats them as hostile: limits are enforced
//! before allocation, the DICOM structure is length-checked before the DICOM parser sees it
//! (the parser zero-fills whatever length an element header claims), panics inside the DICOM
//! stack are contained, and error messages are fixed strings. Nothing from a file's content
//! can reach an error, and patient attributes are never read at all.
//!
//! # Layout
//!
//! - `pipeline`: [`decode`] (dispatch by format) and [`load_scan`] (decode + preprocess).
//! - `format`: [`detect_format`] and the magic numbers.
//! - `limits`: [`Limits`] and the checks made before decoding.
//! - `raster`: PNG and JPEG, under an allocation budget, to luminance.
//! - `dicom`: DICOM (`structure`: the length check; `syntax`: transfer syntaxes).
//! - `resize`: [`preprocess`]: resize and min-max normalisation.
//! - `gray`: [`GrayImage`]; `error`: [`ScanError`] and its stable codes.

mod dicom;
mod error;
mod format;
mod gray;
mod limits;
mod pipeline;
mod raster;
mod resize;
#[cfg(test)]
mod tests;

pub use error::{LimitKind, ScanError};
pub use format::{detect_format, ImageFormat};
pub use gray::GrayImage;
pub use limits::{Limits, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS};
pub use pipeline::{decode, load_scan, load_scan_timed, LoadTimes};
pub use resize::preprocess;
