//! Resize to the model's input size, then min-max normalise to `[0, 1]`.

use fast_image_resize as fir;

use super::error::{corrupt, ScanError};
use super::gray::GrayImage;

/// Relative contrast below which an image counts as flat. Resizing a constant image leaves
/// a few ulps of jitter (f32 epsilon is 1.2e-7), which must not be stretched to [0, 1].
const BLANK_RELATIVE_EPSILON: f32 = 1e-6;

/// Resizes to `size`×`size` and min-max normalises to `[0, 1]`.
///
/// The aspect ratio is not preserved: the model was trained on stretched squares, and
/// padding would move anatomy relative to what it learned. The output always spans exactly
/// 0 to 1; a flat or non-finite image is [`ScanError::BlankImage`].
pub fn preprocess(img: &GrayImage, size: u32) -> Result<Vec<f32>, ScanError> {
    if size == 0 {
        return Err(ScanError::InvalidSize(size));
    }
    if img.width == 0 || img.height == 0 {
        return Err(corrupt("zero-sized image"));
    }
    if img.data.len() as u64 != u64::from(img.width) * u64::from(img.height) {
        return Err(corrupt("pixel buffer does not match the image dimensions"));
    }
    let mut out = resize_f32(img, size)?;
    normalise_min_max(&mut out)?;
    Ok(out)
}

/// Views `f32` samples as bytes for `fast_image_resize`, which takes untyped buffers.
fn f32_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every bit pattern is a valid u8; u8 has alignment 1, and
    // the length covers exactly the same memory. The borrow keeps `data` alive and immutable.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

pub(super) fn resize_f32(img: &GrayImage, size: u32) -> Result<Vec<f32>, ScanError> {
    let src = fir::images::TypedImageRef::<fir::pixels::F32>::from_buffer(
        img.width,
        img.height,
        f32_bytes(&img.data),
    )
    .map_err(|_| corrupt("pixel buffer does not match the image dimensions"))?;
    let mut dst = fir::images::TypedImage::<fir::pixels::F32>::new(size, size);
    // Convolution (not Interpolation) widens the kernel with the scale factor, so a 4×
    // downsample averages every source pixel instead of sampling a quarter of them, which
    // would alias rib edges and noise into the model input.
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    fir::Resizer::new()
        .resize_typed(&src, &mut dst, &options)
        .map_err(|_| corrupt("image could not be resized"))?;
    Ok(dst.pixels().iter().map(|p| p.0).collect())
}

pub(super) fn normalise_min_max(values: &mut [f32]) -> Result<(), ScanError> {
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    for &v in values.iter() {
        if !v.is_finite() {
            return Err(ScanError::BlankImage);
        }
        min = min.min(v);
        max = max.max(v);
    }
    if values.is_empty() {
        return Err(ScanError::BlankImage);
    }
    // f64 so that even a range spanning the whole f32 domain stays finite.
    let (min, max) = (f64::from(min), f64::from(max));
    let range = max - min;
    let scale = min.abs().max(max.abs()).max(1.0);
    if range <= f64::from(BLANK_RELATIVE_EPSILON) * scale {
        return Err(ScanError::BlankImage);
    }
    // Division (not multiplication by 1/range) so that the maximum maps to exactly 1.0.
    for v in values.iter_mut() {
        *v = ((f64::from(*v) - min) / range) as f32;
    }
    Ok(())
}
