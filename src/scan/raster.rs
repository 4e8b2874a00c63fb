//! PNG and JPEG: decoding under an allocation budget, then luminance.

use std::io::Cursor;

use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::error::ImageError;
use image::{DynamicImage, ImageDecoder};

use super::error::{LimitKind, ScanError};
use super::gray::GrayImage;
use super::limits::{check_pixels, Limits};

/// Upper bound on decoded bytes per pixel for the layouts the raster decoders produce
/// (RGBA at 16 bits per channel). Sizes the decoders' allocation budget.
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 8;

/// Decoder allocation headroom on top of the pixel buffer: metadata chunks (ICC profiles,
/// compressed text) and decoder scratch space. Small next to the pixel budget.
const DECODER_ALLOC_HEADROOM: u64 = 16 * 1024 * 1024;

/// Rec. 709 luma weights, the same ones the `image` crate uses for its RGB→Luma conversions,
/// so a colour export converted elsewhere with that crate lands on the same values.
const LUMA_WEIGHTS: [f32; 3] = [0.2126, 0.7152, 0.0722];

/// Decodes a PNG (8 or 16 bits, gray or colour, alpha ignored).
pub(super) fn decode_png(bytes: &[u8], limits: &Limits) -> Result<GrayImage, ScanError> {
    let decoder = PngDecoder::with_limits(Cursor::new(bytes), decoder_limits(limits))
        .map_err(|e| map_image_error(e, "PNG", limits))?;
    decode_raster(decoder, "PNG", limits)
}

/// Decodes a baseline or progressive JPEG, gray or colour.
pub(super) fn decode_jpeg(bytes: &[u8], limits: &Limits) -> Result<GrayImage, ScanError> {
    let mut decoder =
        JpegDecoder::new(Cursor::new(bytes)).map_err(|e| map_image_error(e, "JPEG", limits))?;
    decoder
        .set_limits(decoder_limits(limits))
        .map_err(|e| map_image_error(e, "JPEG", limits))?;
    decode_raster(decoder, "JPEG", limits)
}

fn decoder_limits(limits: &Limits) -> image::Limits {
    // Our own pixel check runs on the header's claim; this budget catches a decoder being
    // driven past that claim (e.g. oversized metadata chunks) before it can exhaust memory.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(
        limits
            .max_pixels
            .saturating_mul(MAX_DECODED_BYTES_PER_PIXEL)
            .saturating_add(DECODER_ALLOC_HEADROOM),
    );
    decoder_limits
}

fn map_image_error(err: ImageError, format: &'static str, limits: &Limits) -> ScanError {
    match err {
        ImageError::Limits(_) => ScanError::TooLarge {
            limit: LimitKind::DecoderMemory,
            actual: None,
            max: decoder_limits(limits).max_alloc.unwrap_or(u64::MAX),
        },
        ImageError::Unsupported(_) => ScanError::UnsupportedFormat,
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ScanError::CorruptImage(format!("truncated {format}"))
        }
        // The decoders' own messages are not guaranteed free of file content (text chunks,
        // comments), so only the format is reported.
        _ => ScanError::CorruptImage(format!("malformed {format}")),
    }
}

fn decode_raster(
    decoder: impl ImageDecoder,
    format: &'static str,
    limits: &Limits,
) -> Result<GrayImage, ScanError> {
    let (width, height) = decoder.dimensions();
    check_pixels(u64::from(width), u64::from(height), limits)?;
    let image =
        DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, format, limits))?;
    Ok(GrayImage {
        width,
        height,
        data: luminance(image),
    })
}

#[inline]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b
}

/// Collapses any decoded layout to one channel at native scale. Alpha is dropped, not
/// composited: radiograph exports carry a constant opaque alpha, and compositing over an
/// arbitrary background would invent intensities.
fn luminance(image: DynamicImage) -> Vec<f32> {
    match image {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| f32::from(v)).collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| f32::from(v)).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| f32::from(p[0]))
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| f32::from(p[0]))
            .collect(),
        DynamicImage::ImageRgb8(b) => rgb_luma(b.as_raw(), 3),
        DynamicImage::ImageRgba8(b) => rgb_luma(b.as_raw(), 4),
        DynamicImage::ImageRgb16(b) => rgb_luma(b.as_raw(), 3),
        DynamicImage::ImageRgba16(b) => rgb_luma(b.as_raw(), 4),
        // Float layouts are not produced by the PNG/JPEG decoders; the enum is open-ended,
        // so fall back to the crate's own conversion (same Rec. 709 weights, 0..1 scale).
        other => other.to_luma32f().into_raw(),
    }
}

fn rgb_luma<T: Copy + Into<f32>>(raw: &[T], channels: usize) -> Vec<f32> {
    raw.chunks_exact(channels)
        .map(|p| luma(p[0].into(), p[1].into(), p[2].into()))
        .collect()
}
