//! Scan decoding and preprocessing: request bytes in, model input out.
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

use std::io::{Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};

use dicom_dictionary_std::{tags, uids};
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::{
    ConvertOptions, DecodedPixelData, ModalityLutOption, PhotometricInterpretation, PixelDecoder,
    VoiLutFunction, VoiLutOption, WindowLevel, WindowLevelTransform,
};
use fast_image_resize as fir;
use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::error::ImageError;
use image::{DynamicImage, ImageDecoder};

/// Default cap on the encoded size of one scan. A 1024² 8-bit PNG is about 1 MB and an
/// uncompressed 16-bit 3000² DICOM about 18 MB; 64 MiB leaves room for large detectors.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Default cap on decoded pixels. The largest flat-panel detectors are around 43 cm at
/// 0.1 mm pitch (≈ 4300² ≈ 18.5 MP); 60 MP is generous while still bounding memory.
pub const DEFAULT_MAX_PIXELS: u64 = 60_000_000;

/// Upper bound on decoded bytes per pixel for the layouts the raster decoders produce
/// (RGBA at 16 bits per channel). Sizes the decoders' allocation budget.
const MAX_DECODED_BYTES_PER_PIXEL: u64 = 8;

/// Decoder allocation headroom on top of the pixel buffer: metadata chunks (ICC profiles,
/// compressed text) and decoder scratch space. Small next to the pixel budget.
const DECODER_ALLOC_HEADROOM: u64 = 16 * 1024 * 1024;

/// Rec. 709 luma weights, the same ones the `image` crate uses for its RGB→Luma conversions,
/// so a colour export converted elsewhere with that crate lands on the same values.
const LUMA_WEIGHTS: [f32; 3] = [0.2126, 0.7152, 0.0722];

/// Relative contrast below which an image counts as flat. Resizing a constant image leaves
/// a few ulps of jitter (f32 epsilon is 1.2e-7), which must not be stretched to [0, 1].
const BLANK_RELATIVE_EPSILON: f32 = 1e-6;

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

/// Container formats accepted for scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG, 8 or 16 bits, gray or colour, with or without alpha.
    Png,
    /// Baseline or progressive JPEG, gray or colour.
    Jpeg,
    /// DICOM Part 10 file (CR/DX and other monochrome images).
    Dicom,
}

impl ImageFormat {
    /// Stable lower-case name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Dicom => "dicom",
        }
    }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
const JPEG_SOI: [u8; 3] = [0xFF, 0xD8, 0xFF];
const DICOM_MAGIC: &[u8; 4] = b"DICM";
const DICOM_PREAMBLE_LEN: usize = 128;
/// `(0002,0000) UL 4`: the File Meta Information Group Length element in explicit VR little
/// endian, which the DICOM parser requires as the first meta element. A stream that starts
/// with it is a Part 10 file whose preamble and magic were stripped (some PACS exports do so).
const DICOM_META_GROUP_LENGTH_HEADER: [u8; 8] = [0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00];

/// Identifies the container from its magic bytes alone.
///
/// Recognises the PNG signature, the JPEG SOI marker (`FF D8 FF`), DICOM Part 10 (`DICM`
/// after the 128-byte preamble, or at offset 0 when the preamble was stripped) and a bare
/// DICOM file meta group. Returns `None` for anything else.
pub fn detect_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&PNG_SIGNATURE) {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&JPEG_SOI) {
        Some(ImageFormat::Jpeg)
    } else if dicom_body(bytes).is_some() {
        Some(ImageFormat::Dicom)
    } else {
        None
    }
}

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

/// Which limit a scan exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// [`Limits::max_bytes`], checked against the input length.
    Bytes,
    /// [`Limits::max_pixels`], checked against the header's dimensions.
    Pixels,
    /// The allocation budget derived from [`Limits::max_pixels`] and handed to the decoder,
    /// which caught the file trying to allocate more than its header announced.
    DecoderMemory,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::Bytes => "byte",
            LimitKind::Pixels => "pixel",
            LimitKind::DecoderMemory => "decoder memory",
        })
    }
}

/// Why a scan could not be turned into model input.
///
/// Messages are fixed strings about structure, never file content, so they are safe to log
/// and to return to clients. Use [`ScanError::code`] for anything machine-readable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// The input had no bytes.
    #[error("empty input")]
    Empty,
    /// The magic bytes match none of PNG, JPEG or DICOM, or the file uses a variant of
    /// PNG/JPEG that the decoders do not implement.
    #[error("unsupported format: expected PNG, JPEG or DICOM")]
    UnsupportedFormat,
    /// The container was recognised but its content is malformed or truncated.
    #[error("corrupt image: {0}")]
    CorruptImage(String),
    /// A resource limit was exceeded; `actual` is known for byte and pixel limits.
    #[error("input exceeds the {limit} limit of {max}{}", describe_actual(.actual))]
    TooLarge {
        /// The limit that was hit.
        limit: LimitKind,
        /// The measured quantity, when known before decoding.
        actual: Option<u64>,
        /// The configured maximum.
        max: u64,
    },
    /// The image has no contrast (flat) or non-finite values, so it cannot be normalised.
    #[error("blank image: no contrast to normalise")]
    BlankImage,
    /// A well-formed DICOM that this pipeline cannot use (transfer syntax, photometric
    /// interpretation, bit depth, missing pixel data).
    #[error("unsupported DICOM: {0}")]
    UnsupportedDicom(String),
    /// [`preprocess`] was asked for a 0×0 output, a caller bug rather than a bad scan.
    #[error("invalid target size {0}: must be at least 1")]
    InvalidSize(u32),
}

fn describe_actual(actual: &Option<u64>) -> String {
    actual.map(|a| format!(" (got {a})")).unwrap_or_default()
}

impl ScanError {
    /// Stable snake_case identifier for API responses, metrics and dataset-build reports.
    pub fn code(&self) -> &'static str {
        match self {
            ScanError::Empty => "empty_body",
            ScanError::UnsupportedFormat => "unsupported_format",
            ScanError::CorruptImage(_) => "corrupt_image",
            ScanError::TooLarge { .. } => "too_large",
            ScanError::BlankImage => "blank_image",
            ScanError::UnsupportedDicom(_) => "unsupported_dicom",
            ScanError::InvalidSize(_) => "invalid_size",
        }
    }
}

fn corrupt(msg: &str) -> ScanError {
    ScanError::CorruptImage(msg.to_owned())
}

fn unsupported_dicom(msg: &str) -> ScanError {
    ScanError::UnsupportedDicom(msg.to_owned())
}

fn check_pixels(width: u64, height: u64, limits: &Limits) -> Result<(), ScanError> {
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
        ImageFormat::Png => {
            let decoder = PngDecoder::with_limits(Cursor::new(bytes), decoder_limits(limits))
                .map_err(|e| map_image_error(e, "PNG", limits))?;
            decode_raster(decoder, "PNG", limits)
        }
        ImageFormat::Jpeg => {
            let mut decoder = JpegDecoder::new(Cursor::new(bytes))
                .map_err(|e| map_image_error(e, "JPEG", limits))?;
            decoder
                .set_limits(decoder_limits(limits))
                .map_err(|e| map_image_error(e, "JPEG", limits))?;
            decode_raster(decoder, "JPEG", limits)
        }
        ImageFormat::Dicom => decode_dicom(bytes, limits),
    }
}

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

/// Decodes and preprocesses one scan: the single entry point for training and serving.
pub fn load_scan(bytes: &[u8], limits: &Limits, size: u32) -> Result<Vec<f32>, ScanError> {
    if size == 0 {
        // Fail before the (possibly expensive) decode on a caller bug.
        return Err(ScanError::InvalidSize(size));
    }
    preprocess(&decode(bytes, limits)?, size)
}

// ---------------------------------------------------------------------------------------------
// Resize and normalise
// ---------------------------------------------------------------------------------------------

/// Views `f32` samples as bytes for `fast_image_resize`, which takes untyped buffers.
fn f32_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every bit pattern is a valid u8; u8 has alignment 1, and
    // the length covers exactly the same memory. The borrow keeps `data` alive and immutable.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

fn resize_f32(img: &GrayImage, size: u32) -> Result<Vec<f32>, ScanError> {
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

fn normalise_min_max(values: &mut [f32]) -> Result<(), ScanError> {
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

// ---------------------------------------------------------------------------------------------
// PNG and JPEG
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// DICOM
// ---------------------------------------------------------------------------------------------

/// Returns the bytes that follow the `DICM` magic (or the whole input for a bare meta group),
/// i.e. what the DICOM parser reads once the magic is put back in front.
fn dicom_body(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() >= DICOM_PREAMBLE_LEN + 4
        && &bytes[DICOM_PREAMBLE_LEN..DICOM_PREAMBLE_LEN + 4] == DICOM_MAGIC
    {
        Some(&bytes[DICOM_PREAMBLE_LEN + 4..])
    } else if bytes.starts_with(DICOM_MAGIC) {
        Some(&bytes[4..])
    } else if bytes.starts_with(&DICOM_META_GROUP_LENGTH_HEADER) {
        Some(bytes)
    } else {
        None
    }
}

/// How the pixel data of an accepted transfer syntax is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PixelCodec {
    Native,
    Jpeg,
    Rle,
}

/// Data set encodings of accepted transfer syntaxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DataSetEncoding {
    explicit_vr: bool,
    big_endian: bool,
}

/// Allow-list of transfer syntaxes whose decoders are compiled in (dicom-pixeldata's pure-Rust
/// `native` set). Checking up front turns "no decoder" into a clear `unsupported_dicom`
/// instead of an opaque decode failure. Deflated data sets are refused on purpose: inflation
/// happens inside the parser, before any limit can be checked (a zip bomb).
fn classify_transfer_syntax(uid: &str) -> Result<(DataSetEncoding, PixelCodec), ScanError> {
    const EXPLICIT_LE: DataSetEncoding = DataSetEncoding {
        explicit_vr: true,
        big_endian: false,
    };
    match uid {
        uids::IMPLICIT_VR_LITTLE_ENDIAN => Ok((
            DataSetEncoding {
                explicit_vr: false,
                big_endian: false,
            },
            PixelCodec::Native,
        )),
        uids::EXPLICIT_VR_LITTLE_ENDIAN => Ok((EXPLICIT_LE, PixelCodec::Native)),
        // Retired (so the dictionary constant is deprecated) but still found in archives.
        "1.2.840.10008.1.2.2" => Ok((
            DataSetEncoding {
                explicit_vr: true,
                big_endian: true,
            },
            PixelCodec::Native,
        )),
        uids::JPEG_BASELINE8_BIT
        | uids::JPEG_EXTENDED12_BIT
        | uids::JPEG_LOSSLESS
        | uids::JPEG_LOSSLESS_SV1 => Ok((EXPLICIT_LE, PixelCodec::Jpeg)),
        uids::RLE_LOSSLESS => Ok((EXPLICIT_LE, PixelCodec::Rle)),
        uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN => {
            Err(unsupported_dicom("deflated transfer syntax"))
        }
        // A well-formed UID (digits and dots) cannot carry patient data and names the codec a
        // site would need; anything else is not echoed.
        other if is_uid(other) => Err(ScanError::UnsupportedDicom(format!(
            "transfer syntax {other} has no decoder"
        ))),
        _ => Err(unsupported_dicom("unrecognised transfer syntax")),
    }
}

fn is_uid(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn decode_dicom(bytes: &[u8], limits: &Limits) -> Result<GrayImage, ScanError> {
    // The DICOM stack has assertions and slice indexing driven by header values (e.g. a LUT
    // asserts on Bits Stored, the JPEG adapter copies by decoded length). One hostile upload
    // must not take a worker down, so a panic becomes an ordinary corrupt-image error.
    catch_unwind(AssertUnwindSafe(|| decode_dicom_unguarded(bytes, limits)))
        .unwrap_or_else(|_| Err(corrupt("DICOM decoder failed")))
}

fn decode_dicom_unguarded(bytes: &[u8], limits: &Limits) -> Result<GrayImage, ScanError> {
    let body = dicom_body(bytes).ok_or(ScanError::UnsupportedFormat)?;
    let codec = structure::check(body)?.codec;

    // Stop right after the pixel data: trailing elements (padding, digital signatures) are of
    // no use here, and anything not parsed cannot fail or allocate.
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_to(tags::PIXEL_DATA)
        .from_reader(Read::chain(&DICOM_MAGIC[..], body))
        .map_err(|_| corrupt("malformed DICOM data set"))?;

    let pixel_data = obj
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| unsupported_dicom("no pixel data"))?;
    let uint = |tag| obj.get(tag).and_then(|e| e.to_int::<u32>().ok());
    let rows = uint(tags::ROWS).ok_or_else(|| corrupt("missing or invalid Rows"))?;
    let cols = uint(tags::COLUMNS).ok_or_else(|| corrupt("missing or invalid Columns"))?;
    check_pixels(u64::from(cols), u64::from(rows), limits)?;

    // CR and DX images are monochrome by definition of their IODs; anything else is not a
    // radiograph this model can read. Checked before decoding, which is the expensive part.
    if uint(tags::SAMPLES_PER_PIXEL).unwrap_or(1) != 1 {
        return Err(unsupported_dicom("more than one sample per pixel"));
    }
    let photometric = obj
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .ok_or_else(|| corrupt("missing Photometric Interpretation"))?;
    if !matches!(
        photometric.trim_end_matches([' ', '\0']),
        "MONOCHROME1" | "MONOCHROME2"
    ) {
        return Err(unsupported_dicom(
            "photometric interpretation is not monochrome",
        ));
    }
    let bits_allocated =
        uint(tags::BITS_ALLOCATED).ok_or_else(|| corrupt("missing Bits Allocated"))?;
    if bits_allocated != 8 && bits_allocated != 16 {
        return Err(unsupported_dicom("bits allocated other than 8 or 16"));
    }
    let bits_stored = uint(tags::BITS_STORED).unwrap_or(bits_allocated);
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(corrupt("bits stored out of range"));
    }

    if codec == PixelCodec::Jpeg {
        // The JPEG decoder sizes its buffers from the JPEG's own frame header, and the DICOM
        // adapter then copies the result into a Rows×Columns buffer. Both must agree, or a
        // small DICOM header could smuggle in a huge JPEG (or crash the copy).
        let first = pixel_data
            .fragments()
            .and_then(|f| f.first())
            .ok_or_else(|| corrupt("encapsulated pixel data has no fragments"))?;
        let frame =
            jpeg_frame_header(first).ok_or_else(|| corrupt("JPEG fragment has no frame header"))?;
        if (u32::from(frame.width), u32::from(frame.height)) != (cols, rows)
            || frame.components != 1
        {
            return Err(corrupt("JPEG frame header disagrees with Rows/Columns"));
        }
    }

    // Multi-frame: the first frame only. Decoding one frame also keeps memory at one frame.
    let decoded = obj
        .decode_pixel_data_frame(0)
        .map_err(|_| corrupt("pixel data could not be decoded"))?;
    if !decoded.photometric_interpretation().is_monochrome() {
        return Err(unsupported_dicom(
            "photometric interpretation is not monochrome",
        ));
    }

    // Modality LUT only (rescale slope/intercept), at full precision. The crate's VOI path for
    // vectors ignores VOI LUT tables, and its MONOCHROME1 handling exists only for images, so
    // VOI and polarity are applied below where their order is explicit.
    let options = ConvertOptions::new()
        .with_modality_lut(ModalityLutOption::Default)
        .with_voi_lut(VoiLutOption::Identity);
    let mut data: Vec<f32> = decoded
        .to_vec_frame_with_options(0, &options)
        .map_err(|_| corrupt("pixel data could not be converted"))?;
    if data.len() as u64 != u64::from(rows) * u64::from(cols) {
        return Err(corrupt("pixel data length does not match Rows/Columns"));
    }

    apply_voi(&mut data, &decoded);
    if *decoded.photometric_interpretation() == PhotometricInterpretation::Monochrome1 {
        invert_in_place(&mut data);
    }
    Ok(GrayImage {
        width: cols,
        height: rows,
        data,
    })
}

/// Applies the object's first VOI transformation: the VOI LUT table if present, else the first
/// window. The table wins when both exist, as in dicom-rs's image path and pydicom, so the
/// model sees what a viewer shows. Presentation LUT Shape is not applied: for DX it only
/// restates the MONOCHROME1/2 inversion, and applying it too would invert twice.
fn apply_voi(values: &mut [f32], decoded: &DecodedPixelData<'_>) {
    if let Some(lut) = decoded
        .voi_lut_sequence()
        .ok()
        .flatten()
        .and_then(|luts| luts.first())
        .filter(|lut| !lut.data.is_empty())
    {
        let last = (lut.data.len() - 1) as i64;
        let first_input = i64::from(lut.min_pixel_value);
        for v in values.iter_mut() {
            // `as i64` saturates (NaN → 0); the clamp keeps out-of-range inputs on the ends,
            // as the standard prescribes.
            let index = (v.round() as i64)
                .saturating_sub(first_input)
                .clamp(0, last);
            *v = f32::from(lut.data[index as usize]);
        }
        return;
    }
    let window = decoded
        .window()
        .ok()
        .flatten()
        .and_then(|w| w.first().copied());
    // A window with a non-finite centre or a non-positive width is a broken header; the
    // modality values are then the best available image, and min-max normalisation follows.
    if let Some(window) =
        window.filter(|w| w.center.is_finite() && w.width.is_finite() && w.width > 0.0)
    {
        let function = decoded
            .voi_lut_function()
            .ok()
            .flatten()
            .and_then(|f| f.first().copied())
            .unwrap_or(VoiLutFunction::Linear);
        let transform = WindowLevelTransform::new(
            function,
            WindowLevel {
                center: window.center,
                width: window.width,
            },
        );
        for v in values.iter_mut() {
            *v = transform.apply(f64::from(*v), 1.0) as f32;
        }
    }
}

/// Mirrors values within their own range (`min + max - v`), turning MONOCHROME1 (air bright)
/// into MONOCHROME2 polarity while keeping the native scale.
fn invert_in_place(values: &mut [f32]) {
    let (min, max) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if min > max {
        return; // no finite values; normalisation will reject the image
    }
    let pivot = min + max;
    for v in values.iter_mut() {
        *v = pivot - *v;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JpegFrameHeader {
    width: u16,
    height: u16,
    components: u8,
}

/// Finds the first SOFn segment of a JPEG stream and returns its frame dimensions.
fn jpeg_frame_header(data: &[u8]) -> Option<JpegFrameHeader> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while data.get(i) == Some(&0xFF) && data.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if *data.get(i)? != 0xFF {
            return None;
        }
        let marker = *data.get(i + 1)?;
        match marker {
            // Stand-alone markers carry no length.
            0x01 | 0xD0..=0xD8 => {
                i += 2;
                continue;
            }
            // End of image or start of scan before any frame header: not a valid frame.
            0xD9 | 0xDA => return None,
            _ => {}
        }
        let segment_len = usize::from(u16::from_be_bytes([*data.get(i + 2)?, *data.get(i + 3)?]));
        if segment_len < 2 {
            return None;
        }
        // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let header = data.get(i + 4..i + 10)?;
            return Some(JpegFrameHeader {
                height: u16::from_be_bytes([header[1], header[2]]),
                width: u16::from_be_bytes([header[3], header[4]]),
                components: header[5],
            });
        }
        i += 2 + segment_len;
    }
}

/// Length sanity check of a DICOM stream, run before the real parser.
///
/// dicom-parser zero-fills a buffer of whatever length an element header claims before it
/// reads the value, so a 200-byte upload claiming a 4 GiB element costs 4 GiB of real memory.
/// This walker mirrors the parser's framing (file meta group, explicit/implicit VR, nested
/// sequences and items, encapsulated pixel fragments) and rejects any defined length that
/// exceeds the bytes left in its container. It validates nothing else: other malformations
/// are left to the parser, which then fails without a large allocation.
mod structure {
    use super::{classify_transfer_syntax, corrupt, PixelCodec, ScanError};

    const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;
    const ITEM: (u16, u16) = (0xFFFE, 0xE000);
    const ITEM_DELIMITER: (u16, u16) = (0xFFFE, 0xE00D);
    const SEQUENCE_DELIMITER: (u16, u16) = (0xFFFE, 0xE0DD);
    const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
    const TRANSFER_SYNTAX_UID: (u16, u16) = (0x0002, 0x0010);
    /// Real objects nest a handful of levels; the bound keeps recursion off the stack limit.
    const MAX_DEPTH: u32 = 32;
    /// Explicit VRs with a 16-bit length. Every other VR, including unknown ones (which the
    /// parser reads as UN), has two reserved bytes and a 32-bit length.
    const SHORT_VRS: [&[u8; 2]; 21] = [
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    ];

    /// What the walk learned about the stream.
    #[derive(Debug)]
    pub(super) struct Layout {
        pub(super) codec: PixelCodec,
    }

    fn too_long() -> ScanError {
        corrupt("DICOM element length exceeds the available data")
    }

    /// Checks `body` (the bytes after the `DICM` magic); fails on unsupported transfer
    /// syntaxes before walking the data set, whose encoding they determine.
    pub(super) fn check(body: &[u8]) -> Result<Layout, ScanError> {
        // The file meta group is always explicit VR little endian and must open with its
        // group length, which is how the parser finds where the data set starts.
        let mut meta = Walker {
            buf: body,
            pos: 0,
            explicit_vr: true,
            big_endian: false,
        };
        if body.len() < 12 || body[..8] != super::DICOM_META_GROUP_LENGTH_HEADER {
            return Err(corrupt("missing DICOM file meta group length"));
        }
        let group_length = meta.u32_at(8) as usize;
        let meta_end = 12usize
            .checked_add(group_length)
            .filter(|&end| end <= body.len())
            .ok_or_else(too_long)?;
        meta.pos = 12;
        let mut transfer_syntax = None;
        while meta.pos < meta_end {
            if meta_end - meta.pos < 8 {
                return Err(corrupt("truncated DICOM file meta group"));
            }
            let tag = meta.tag_at(meta.pos);
            let (_, len) = meta.header(meta_end)?;
            if len == UNDEFINED_LENGTH || len as usize > meta_end - meta.pos {
                return Err(too_long());
            }
            let value = &body[meta.pos..meta.pos + len as usize];
            if tag == TRANSFER_SYNTAX_UID {
                let uid = std::str::from_utf8(value)
                    .map_err(|_| corrupt("transfer syntax UID is not text"))?;
                transfer_syntax = Some(uid.trim_end_matches(['\0', ' ']).to_owned());
            }
            meta.pos += len as usize;
        }
        let transfer_syntax =
            transfer_syntax.ok_or_else(|| corrupt("missing transfer syntax UID"))?;

        let (encoding, codec) = classify_transfer_syntax(&transfer_syntax)?;
        let mut walker = Walker {
            buf: body,
            pos: meta_end,
            explicit_vr: encoding.explicit_vr,
            big_endian: encoding.big_endian,
        };
        walker.data_set(body.len(), 0, true)?;
        Ok(Layout { codec })
    }

    struct Walker<'a> {
        buf: &'a [u8],
        pos: usize,
        explicit_vr: bool,
        big_endian: bool,
    }

    impl Walker<'_> {
        fn u16_at(&self, at: usize) -> u16 {
            let b = [self.buf[at], self.buf[at + 1]];
            if self.big_endian {
                u16::from_be_bytes(b)
            } else {
                u16::from_le_bytes(b)
            }
        }

        fn u32_at(&self, at: usize) -> u32 {
            let b = [
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ];
            if self.big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        }

        fn tag_at(&self, at: usize) -> (u16, u16) {
            (self.u16_at(at), self.u16_at(at + 2))
        }

        /// Reads the element header at `pos` (at least 8 bytes must remain before `end`),
        /// advances past it and returns the explicit VR (if any) and the value length.
        fn header(&mut self, end: usize) -> Result<(Option<[u8; 2]>, u32), ScanError> {
            let at = self.pos;
            // Item and delimiter tags never carry a VR, even in explicit VR streams.
            if !self.explicit_vr || self.u16_at(at) == 0xFFFE {
                self.pos += 8;
                return Ok((None, self.u32_at(at + 4)));
            }
            let vr = [self.buf[at + 4], self.buf[at + 5]];
            if SHORT_VRS.contains(&&vr) {
                self.pos += 8;
                Ok((Some(vr), u32::from(self.u16_at(at + 6))))
            } else {
                if end - at < 12 {
                    return Err(corrupt("truncated DICOM element header"));
                }
                self.pos += 12;
                Ok((Some(vr), self.u32_at(at + 8)))
            }
        }

        /// Whether a defined-length value holds nested items the parser will descend into.
        fn is_sequence(&self, tag: (u16, u16), vr: Option<[u8; 2]>, len: usize) -> bool {
            match vr {
                Some(vr) => &vr == b"SQ",
                // Implicit VR: the parser asks its dictionary, which is not reachable from
                // here. A value that opens with an item tag is a sequence in practice; pixel
                // and overlay data are excluded because their samples could spell one.
                None => {
                    let bulk = tag == PIXEL_DATA || (tag.0 >> 8 == 0x60 && tag.1 == 0x3000);
                    !bulk && len >= 8 && self.tag_at(self.pos) == ITEM
                }
            }
        }

        /// Walks data set elements until `end`, an item delimiter (nested data sets) or,
        /// at the top level, just past the pixel data (where the parser is told to stop).
        fn data_set(&mut self, end: usize, depth: u32, top_level: bool) -> Result<(), ScanError> {
            if depth > MAX_DEPTH {
                return Err(corrupt("DICOM sequences nested too deeply"));
            }
            while self.pos < end {
                if end - self.pos < 8 {
                    // The parser treats a short tail as the end of the object (top level)
                    // or fails on it; either way nothing is allocated from it.
                    return Ok(());
                }
                let tag = self.tag_at(self.pos);
                if tag == ITEM_DELIMITER {
                    self.pos += 8;
                    if top_level {
                        continue; // the parser skips stray delimiters at the top level
                    }
                    return Ok(());
                }
                let (vr, len) = self.header(end)?;
                if len == UNDEFINED_LENGTH {
                    if tag == PIXEL_DATA {
                        self.fragments(end)?;
                    } else {
                        // Undefined length makes any element a sequence for the parser.
                        self.sequence(None, end, depth + 1)?;
                    }
                } else {
                    let len = len as usize;
                    if len > end - self.pos {
                        return Err(too_long());
                    }
                    let value_end = self.pos + len;
                    if self.is_sequence(tag, vr, len) {
                        self.sequence(Some(value_end), value_end, depth + 1)?;
                    }
                    self.pos = value_end;
                }
                if top_level && tag == PIXEL_DATA {
                    return Ok(());
                }
            }
            Ok(())
        }

        /// Walks sequence items until `defined_end`, a sequence delimiter or `bound`.
        fn sequence(
            &mut self,
            defined_end: Option<usize>,
            bound: usize,
            depth: u32,
        ) -> Result<(), ScanError> {
            if depth > MAX_DEPTH {
                return Err(corrupt("DICOM sequences nested too deeply"));
            }
            loop {
                if defined_end.is_some_and(|end| self.pos >= end) || bound - self.pos < 8 {
                    return Ok(());
                }
                let tag = self.tag_at(self.pos);
                let len = self.u32_at(self.pos + 4);
                self.pos += 8;
                match tag {
                    SEQUENCE_DELIMITER => return Ok(()),
                    ITEM if len == UNDEFINED_LENGTH => self.data_set(bound, depth + 1, false)?,
                    ITEM => {
                        let len = len as usize;
                        if len > bound - self.pos {
                            return Err(too_long());
                        }
                        let item_end = self.pos + len;
                        self.data_set(item_end, depth + 1, false)?;
                        self.pos = item_end;
                    }
                    _ => return Err(corrupt("unexpected element in DICOM sequence")),
                }
            }
        }

        /// Walks encapsulated pixel data: an offset table and fragments, all as items.
        fn fragments(&mut self, bound: usize) -> Result<(), ScanError> {
            loop {
                if bound - self.pos < 8 {
                    return Ok(());
                }
                let tag = self.tag_at(self.pos);
                let len = self.u32_at(self.pos + 4);
                self.pos += 8;
                match tag {
                    SEQUENCE_DELIMITER => return Ok(()),
                    ITEM if len != UNDEFINED_LENGTH && len as usize <= bound - self.pos => {
                        self.pos += len as usize;
                    }
                    ITEM => return Err(too_long()),
                    _ => return Err(corrupt("unexpected element in encapsulated pixel data")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::{ExtendedColorType, ImageEncoder};
    use std::path::PathBuf;
    use std::time::Instant;

    // ---- helpers -------------------------------------------------------------------------

    /// Real test data: `PLEURA_DATA`, else `../shared/data` beside the workspace.
    fn data_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("PLEURA_DATA") {
            return Some(PathBuf::from(dir));
        }
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"));
        dir.is_dir().then_some(dir)
    }

    fn require_data(test: &str) -> Option<PathBuf> {
        let dir = data_dir();
        if dir.is_none() {
            eprintln!("SKIP: {test}: no real test data (set PLEURA_DATA)");
        }
        dir
    }

    fn encode_png(width: u32, height: u32, color: ExtendedColorType, raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(raw, width, height, color)
            .unwrap();
        out
    }

    fn encode_jpeg(width: u32, height: u32, color: ExtendedColorType, raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(raw, width, height, color)
            .unwrap();
        out
    }

    /// A smooth 8-bit gradient with some structure, so resizing has something to do.
    fn gradient8(width: u32, height: u32) -> Vec<u8> {
        (0..height)
            .flat_map(|y| (0..width).map(move |x| ((x * 7 + y * 3) % 200 + 20) as u8))
            .collect()
    }

    fn min_max(values: &[f32]) -> (f32, f32) {
        values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            })
    }

    fn mean(values: impl IntoIterator<Item = f32>) -> f32 {
        let (sum, n) = values
            .into_iter()
            .fold((0.0f64, 0usize), |(s, n), v| (s + f64::from(v), n + 1));
        (sum / n as f64) as f32
    }

    fn code_of<T: std::fmt::Debug>(r: Result<T, ScanError>) -> &'static str {
        r.expect_err("expected an error").code()
    }

    // ---- PNG bomb: a valid PNG of zeros written with a hand-rolled deflate stream ----------

    /// Bit sink for DEFLATE: fields are packed LSB first, Huffman codes MSB first.
    struct BitWriter {
        out: Vec<u8>,
        acc: u64,
        bits: u32,
    }

    impl BitWriter {
        fn put(&mut self, value: u32, n: u32) {
            self.acc |= u64::from(value) << self.bits;
            self.bits += n;
            while self.bits >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.bits -= 8;
            }
        }

        fn put_code(&mut self, code: u32, n: u32) {
            self.put(code.reverse_bits() >> (32 - n), n);
        }
    }

    fn crc32(parts: &[&[u8]]) -> u32 {
        let mut c = !0u32;
        for &b in parts.iter().flat_map(|p| p.iter()) {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// zlib stream of `n` zero bytes using fixed Huffman codes: one literal, then
    /// 258-byte back-references at distance 1 (13 bits each, ~160x compression).
    fn zlib_zeros(n: usize) -> Vec<u8> {
        let mut w = BitWriter {
            out: vec![0x78, 0x01],
            acc: 0,
            bits: 0,
        };
        w.put(1, 1); // final block
        w.put(1, 2); // fixed Huffman
        let mut left = n;
        if left > 0 {
            w.put_code(0x30, 8); // literal 0
            left -= 1;
        }
        while left >= 258 {
            w.put_code(0xC5, 8); // length symbol 285 = 258 bytes
            w.put_code(0, 5); // distance symbol 0 = 1 byte back
            left -= 258;
        }
        for _ in 0..left {
            w.put_code(0x30, 8);
        }
        w.put_code(0, 7); // end of block
        if w.bits > 0 {
            w.out.push(w.acc as u8);
        }
        // Adler-32 of zeros: a stays 1, b gains 1 per byte.
        let adler = (((n % 65521) as u32) << 16) | 1;
        w.out.extend_from_slice(&adler.to_be_bytes());
        w.out
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    }

    /// An all-black 8-bit gray PNG of any size, built without allocating its pixels.
    fn zero_png(width: u32, height: u32) -> Vec<u8> {
        let mut out = PNG_SIGNATURE.to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray, deflate, no filter, no interlace
        png_chunk(&mut out, b"IHDR", &ihdr);
        // Each row is a filter-type byte (0) followed by `width` zero samples.
        let raw_len = height as usize * (width as usize + 1);
        png_chunk(&mut out, b"IDAT", &zlib_zeros(raw_len));
        png_chunk(&mut out, b"IEND", &[]);
        out
    }

    // ---- synthetic DICOM --------------------------------------------------------------------

    const LONG_VRS: [&[u8; 2]; 6] = [b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"];

    fn element(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        if LONG_VRS.contains(&vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    fn implicit_element(out: &mut Vec<u8>, tag: (u16, u16), value: &[u8]) {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }

    /// Text value padded to even length, as DICOM requires.
    fn text(s: &str, pad: u8) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(pad);
        }
        v
    }

    fn us(v: u16) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    /// Preamble, magic and a file meta group announcing `ts`.
    fn dicom_header(ts: &str) -> Vec<u8> {
        let mut meta = Vec::new();
        element(&mut meta, (0x0002, 0x0001), b"OB", &[0, 1]);
        element(
            &mut meta,
            (0x0002, 0x0002),
            b"UI",
            &text("1.2.840.10008.5.1.4.1.1.1", 0),
        );
        element(&mut meta, (0x0002, 0x0003), b"UI", &text("1.2.3.4.5", 0));
        element(&mut meta, (0x0002, 0x0010), b"UI", &text(ts, 0));
        element(&mut meta, (0x0002, 0x0012), b"UI", &text("1.2.3.4", 0));
        let mut out = vec![0u8; DICOM_PREAMBLE_LEN];
        out.extend_from_slice(DICOM_MAGIC);
        element(
            &mut out,
            (0x0002, 0x0000),
            b"UL",
            &(meta.len() as u32).to_le_bytes(),
        );
        out.extend_from_slice(&meta);
        out
    }

    /// A synthetic monochrome radiograph in explicit VR little endian.
    #[derive(Clone)]
    struct SynthDicom {
        rows: u16,
        cols: u16,
        bits_allocated: u16,
        bits_stored: u16,
        photometric: &'static str,
        window: Option<(f64, f64)>,
        rescale: Option<(f64, f64)>,
        patient_name: Option<&'static str>,
        pixels: Vec<u16>,
        transfer_syntax: &'static str,
        include_pixel_data: bool,
        /// Raw elements inserted between group 0008 and group 0010 (keeps tag order).
        extra: Vec<u8>,
    }

    impl SynthDicom {
        fn new(rows: u16, cols: u16, pixels: Vec<u16>) -> Self {
            Self {
                rows,
                cols,
                bits_allocated: 16,
                bits_stored: 12,
                photometric: "MONOCHROME2",
                window: None,
                rescale: None,
                patient_name: None,
                pixels,
                transfer_syntax: uids::EXPLICIT_VR_LITTLE_ENDIAN,
                include_pixel_data: true,
                extra: Vec::new(),
            }
        }

        fn data_set(&self) -> Vec<u8> {
            let mut ds = Vec::new();
            element(
                &mut ds,
                (0x0008, 0x0016),
                b"UI",
                &text("1.2.840.10008.5.1.4.1.1.1", 0),
            );
            element(&mut ds, (0x0008, 0x0060), b"CS", &text("CR", b' '));
            ds.extend_from_slice(&self.extra);
            if let Some(name) = self.patient_name {
                element(&mut ds, (0x0010, 0x0010), b"PN", &text(name, b' '));
            }
            element(&mut ds, (0x0028, 0x0002), b"US", &us(1));
            element(
                &mut ds,
                (0x0028, 0x0004),
                b"CS",
                &text(self.photometric, b' '),
            );
            element(&mut ds, (0x0028, 0x0010), b"US", &us(self.rows));
            element(&mut ds, (0x0028, 0x0011), b"US", &us(self.cols));
            element(&mut ds, (0x0028, 0x0100), b"US", &us(self.bits_allocated));
            element(&mut ds, (0x0028, 0x0101), b"US", &us(self.bits_stored));
            element(
                &mut ds,
                (0x0028, 0x0102),
                b"US",
                &us(self.bits_stored.saturating_sub(1)),
            );
            element(&mut ds, (0x0028, 0x0103), b"US", &us(0));
            if let Some((center, width)) = self.window {
                element(
                    &mut ds,
                    (0x0028, 0x1050),
                    b"DS",
                    &text(&center.to_string(), b' '),
                );
                element(
                    &mut ds,
                    (0x0028, 0x1051),
                    b"DS",
                    &text(&width.to_string(), b' '),
                );
            }
            if let Some((intercept, slope)) = self.rescale {
                element(
                    &mut ds,
                    (0x0028, 0x1052),
                    b"DS",
                    &text(&intercept.to_string(), b' '),
                );
                element(
                    &mut ds,
                    (0x0028, 0x1053),
                    b"DS",
                    &text(&slope.to_string(), b' '),
                );
            }
            if self.include_pixel_data {
                let bytes: Vec<u8> = if self.bits_allocated == 8 {
                    let mut b: Vec<u8> = self.pixels.iter().map(|&p| p as u8).collect();
                    if b.len() % 2 == 1 {
                        b.push(0);
                    }
                    b
                } else {
                    self.pixels.iter().flat_map(|p| p.to_le_bytes()).collect()
                };
                let vr = if self.bits_allocated == 8 {
                    b"OB"
                } else {
                    b"OW"
                };
                element(&mut ds, (0x7FE0, 0x0010), vr, &bytes);
            }
            ds
        }

        fn build(&self) -> Vec<u8> {
            let mut out = dicom_header(self.transfer_syntax);
            out.extend_from_slice(&self.data_set());
            out
        }
    }

    fn ramp(n: usize, step: u16) -> Vec<u16> {
        (0..n).map(|i| i as u16 * step).collect()
    }

    // ---- format detection -----------------------------------------------------------------

    #[test]
    fn detects_formats_from_magic_bytes() {
        let png = encode_png(4, 4, ExtendedColorType::L8, &[7; 16]);
        let jpeg = encode_jpeg(8, 8, ExtendedColorType::L8, &[7; 64]);
        let dicom = SynthDicom::new(2, 2, vec![1, 2, 3, 4]).build();
        assert_eq!(detect_format(&png), Some(ImageFormat::Png));
        assert_eq!(detect_format(&jpeg), Some(ImageFormat::Jpeg));
        assert_eq!(detect_format(&dicom), Some(ImageFormat::Dicom));
        // Preamble stripped, and preamble plus magic stripped.
        assert_eq!(
            detect_format(&dicom[DICOM_PREAMBLE_LEN..]),
            Some(ImageFormat::Dicom)
        );
        assert_eq!(
            detect_format(&dicom[DICOM_PREAMBLE_LEN + 4..]),
            Some(ImageFormat::Dicom)
        );
        assert_eq!(detect_format(b"hello world"), None);
        assert_eq!(detect_format(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"), None);
        assert_eq!(detect_format(b""), None);
        // A bare "DICM" 128 bytes in needs the preamble to be there.
        assert_eq!(detect_format(&[0u8; 131]), None);
    }

    #[test]
    fn format_comes_from_bytes_not_file_name() {
        // PNG bytes saved under a DICOM name still load as PNG; the API never sees names.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scan.dcm");
        std::fs::write(
            &path,
            encode_png(16, 16, ExtendedColorType::L8, &gradient8(16, 16)),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(detect_format(&bytes), Some(ImageFormat::Png));
        assert_eq!(load_scan(&bytes, &Limits::default(), 8).unwrap().len(), 64);
    }

    #[test]
    fn dicom_without_preamble_decodes() {
        let file = SynthDicom::new(2, 3, vec![10, 20, 30, 40, 50, 60]).build();
        let expected = decode(&file, &Limits::default()).unwrap();
        for variant in [&file[DICOM_PREAMBLE_LEN..], &file[DICOM_PREAMBLE_LEN + 4..]] {
            assert_eq!(decode(variant, &Limits::default()).unwrap(), expected);
        }
    }

    // ---- error mapping ----------------------------------------------------------------------

    #[test]
    fn error_codes_are_stable() {
        let cases = [
            (ScanError::Empty, "empty_body"),
            (ScanError::UnsupportedFormat, "unsupported_format"),
            (ScanError::CorruptImage("x".into()), "corrupt_image"),
            (
                ScanError::TooLarge {
                    limit: LimitKind::Bytes,
                    actual: Some(2),
                    max: 1,
                },
                "too_large",
            ),
            (ScanError::BlankImage, "blank_image"),
            (ScanError::UnsupportedDicom("x".into()), "unsupported_dicom"),
            (ScanError::InvalidSize(0), "invalid_size"),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn empty_input_is_empty_body() {
        assert_eq!(code_of(load_scan(&[], &Limits::default(), 8)), "empty_body");
    }

    #[test]
    fn non_images_are_unsupported_format() {
        for bytes in [
            &b"hello world"[..],
            b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n",
            b"GIF89a\x01\x00",
        ] {
            assert_eq!(
                code_of(load_scan(bytes, &Limits::default(), 8)),
                "unsupported_format"
            );
        }
    }

    #[test]
    fn truncated_png_is_corrupt() {
        let png = encode_png(64, 64, ExtendedColorType::L8, &gradient8(64, 64));
        for cut in [9, 20, 40, png.len() / 2, png.len() - 13] {
            let err = decode(&png[..cut], &Limits::default()).unwrap_err();
            assert_eq!(err.code(), "corrupt_image", "cut at {cut}: {err}");
        }
    }

    #[test]
    fn garbage_after_png_signature_is_corrupt() {
        let mut bytes = PNG_SIGNATURE.to_vec();
        let mut x = 0x1234_5678u32;
        bytes.extend((0..4096).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        assert_eq!(code_of(decode(&bytes, &Limits::default())), "corrupt_image");
    }

    #[test]
    fn truncated_jpeg_header_is_corrupt() {
        let jpeg = encode_jpeg(32, 32, ExtendedColorType::L8, &gradient8(32, 32));
        assert_eq!(
            code_of(decode(&jpeg[..40], &Limits::default())),
            "corrupt_image"
        );
    }

    #[test]
    fn png_bomb_is_too_large_before_decoding() {
        let bomb = zero_png(10_000, 10_000);
        assert!(bomb.len() < 1024 * 1024, "bomb is {} bytes", bomb.len());
        let started = Instant::now();
        let err = decode(&bomb, &Limits::default()).unwrap_err();
        eprintln!(
            "100 MP bomb ({} bytes) rejected in {:?}",
            bomb.len(),
            started.elapsed()
        );
        // Decoding it would have produced `blank_image` (all zeros), so `too_large` proves the
        // header check ran first.
        assert_eq!(
            err,
            ScanError::TooLarge {
                limit: LimitKind::Pixels,
                actual: Some(100_000_000),
                max: DEFAULT_MAX_PIXELS
            }
        );
    }

    #[test]
    fn bomb_generator_makes_valid_pngs() {
        // Guards the test above: the same generator at a small size decodes completely.
        let img = decode(&zero_png(300, 200), &Limits::default()).unwrap();
        assert_eq!((img.width, img.height), (300, 200));
        assert!(img.data.iter().all(|&v| v == 0.0));
        assert_eq!(code_of(preprocess(&img, 16)), "blank_image");
    }

    #[test]
    fn max_bytes_is_checked_first() {
        let png = encode_png(64, 64, ExtendedColorType::L8, &gradient8(64, 64));
        let limits = Limits {
            max_bytes: png.len() - 1,
            ..Limits::default()
        };
        assert_eq!(
            decode(&png, &limits).unwrap_err(),
            ScanError::TooLarge {
                limit: LimitKind::Bytes,
                actual: Some(png.len() as u64),
                max: png.len() as u64 - 1
            }
        );
        // Bytes are checked before the format: even garbage over the limit is too large.
        let limits = Limits {
            max_bytes: 4,
            ..Limits::default()
        };
        assert_eq!(code_of(decode(b"hello world", &limits)), "too_large");
        let limits = Limits {
            max_bytes: png.len(),
            ..Limits::default()
        };
        assert!(decode(&png, &limits).is_ok());
    }

    #[test]
    fn max_pixels_is_exact() {
        let png = encode_png(10, 10, ExtendedColorType::L8, &gradient8(10, 10));
        let at_limit = Limits {
            max_pixels: 100,
            ..Limits::default()
        };
        assert!(decode(&png, &at_limit).is_ok());
        let below = Limits {
            max_pixels: 99,
            ..Limits::default()
        };
        assert_eq!(code_of(decode(&png, &below)), "too_large");
    }

    #[test]
    fn limits_deserialize_with_defaults() {
        let limits: Limits = serde_json::from_str(r#"{"max_bytes": 1000}"#).unwrap();
        assert_eq!(
            limits,
            Limits {
                max_bytes: 1000,
                max_pixels: DEFAULT_MAX_PIXELS
            }
        );
        assert_eq!(Limits::default().max_bytes, DEFAULT_MAX_BYTES);
    }

    // ---- raster decoding ---------------------------------------------------------------------

    #[test]
    fn gray16_png_keeps_native_scale() {
        let (w, h) = (16u32, 8u32);
        let samples: Vec<u16> = (0..w * h)
            .map(|i| if i % 3 == 0 { 1000 } else { 50_000 })
            .collect();
        let raw: Vec<u8> = samples.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let png = encode_png(w, h, ExtendedColorType::L16, &raw);
        let img = decode(&png, &Limits::default()).unwrap();
        let expected: Vec<f32> = samples.iter().map(|&v| f32::from(v)).collect();
        assert_eq!(
            img.data, expected,
            "16-bit samples must not be squashed to 8 bits"
        );
        let out = preprocess(&img, w).unwrap();
        assert_eq!(min_max(&out), (0.0, 1.0));
    }

    #[test]
    fn gray_alpha_png_ignores_alpha() {
        let (w, h) = (20u32, 10u32);
        let gray = gradient8(w, h);
        let with_alpha: Vec<u8> = gray
            .iter()
            .enumerate()
            .flat_map(|(i, &g)| [g, (i * 37 % 256) as u8])
            .collect();
        let plain = decode(
            &encode_png(w, h, ExtendedColorType::L8, &gray),
            &Limits::default(),
        )
        .unwrap();
        let alpha = decode(
            &encode_png(w, h, ExtendedColorType::La8, &with_alpha),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(alpha, plain);
    }

    #[test]
    fn colour_pngs_use_luminance_and_ignore_alpha() {
        let (w, h) = (12u32, 6u32);
        let gray = gradient8(w, h);
        let plain = decode(
            &encode_png(w, h, ExtendedColorType::L8, &gray),
            &Limits::default(),
        )
        .unwrap();
        let rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
        let rgba: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g, 255]).collect();
        let rgba16: Vec<u8> = gray
            .iter()
            .flat_map(|&g| {
                [
                    u16::from(g) * 257,
                    u16::from(g) * 257,
                    u16::from(g) * 257,
                    7,
                ]
            })
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        for (color, raw, scale) in [
            (ExtendedColorType::Rgb8, &rgb, 1.0f32),
            (ExtendedColorType::Rgba8, &rgba, 1.0),
            (ExtendedColorType::Rgba16, &rgba16, 257.0),
        ] {
            let img = decode(&encode_png(w, h, color, raw), &Limits::default()).unwrap();
            for (a, b) in img.data.iter().zip(&plain.data) {
                assert!((a / scale - b).abs() < 1e-3, "{color:?}: {a} vs {b}");
            }
        }
        // Weighted, not averaged: pure green is much brighter than pure blue.
        let green = decode(
            &encode_png(1, 1, ExtendedColorType::Rgb8, &[0, 255, 0]),
            &Limits::default(),
        )
        .unwrap();
        let blue = decode(
            &encode_png(1, 1, ExtendedColorType::Rgb8, &[0, 0, 255]),
            &Limits::default(),
        )
        .unwrap();
        assert!((green.data[0] - 0.7152 * 255.0).abs() < 1e-3);
        assert!((blue.data[0] - 0.0722 * 255.0).abs() < 1e-3);
    }

    #[test]
    fn jpeg_gray_and_colour_decode() {
        let (w, h) = (64u32, 48u32);
        let gray = gradient8(w, h);
        let rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
        for (color, raw) in [
            (ExtendedColorType::L8, gray.clone()),
            (ExtendedColorType::Rgb8, rgb),
        ] {
            let img = decode(&encode_jpeg(w, h, color, &raw), &Limits::default()).unwrap();
            assert_eq!((img.width, img.height), (w, h));
            let expected = mean(gray.iter().map(|&g| f32::from(g)));
            assert!(
                (mean(img.data.iter().copied()) - expected).abs() < 2.0,
                "{color:?}"
            );
            let out = preprocess(&img, 32).unwrap();
            assert_eq!(min_max(&out), (0.0, 1.0));
        }
    }

    // ---- preprocess ---------------------------------------------------------------------------

    #[test]
    fn normalises_min_max_and_never_divides_by_255() {
        // Values 100..=150 only: /255 would give 0.39..0.59; min-max must span exactly [0, 1].
        let n = 51u32;
        let raw: Vec<u8> = (0..n).flat_map(|_| (0..n).map(|x| 100 + x as u8)).collect();
        let png = encode_png(n, n, ExtendedColorType::L8, &raw);
        // Same size: the resize is a copy, so every value is checkable exactly.
        let out = load_scan(&png, &Limits::default(), n).unwrap();
        assert_eq!(min_max(&out), (0.0, 1.0));
        assert_eq!(out[25], 0.5);
        assert!((out[10] - 0.2).abs() < 1e-6);
        // Resized, the output still spans exactly [0, 1].
        let out = load_scan(&png, &Limits::default(), 16).unwrap();
        assert_eq!(min_max(&out), (0.0, 1.0));
    }

    #[test]
    fn output_has_requested_size_for_non_square_input() {
        let img = GrayImage {
            width: 40,
            height: 25,
            data: (0..1000).map(|i| i as f32).collect(),
        };
        for size in [1u32, 7, 25, 64] {
            // A 1x1 output is necessarily flat.
            match preprocess(&img, size) {
                Ok(out) => assert_eq!(out.len(), (size * size) as usize),
                Err(e) => assert!(size == 1 && e == ScanError::BlankImage, "{size}: {e}"),
            }
        }
    }

    #[test]
    fn flat_and_non_finite_images_are_blank() {
        let flat = GrayImage {
            width: 64,
            height: 64,
            data: vec![200.0; 64 * 64],
        };
        assert_eq!(preprocess(&flat, 16).unwrap_err(), ScanError::BlankImage);
        let flat_png = encode_png(32, 32, ExtendedColorType::L8, &[77; 32 * 32]);
        assert_eq!(
            code_of(load_scan(&flat_png, &Limits::default(), 16)),
            "blank_image"
        );
        // Contrast far below f32 precision at this magnitude is still flat.
        let mut almost = vec![1.0e6f32; 16];
        almost[3] = 1.0e6 + 0.0625;
        let almost = GrayImage {
            width: 4,
            height: 4,
            data: almost,
        };
        assert_eq!(preprocess(&almost, 4).unwrap_err(), ScanError::BlankImage);
        // The widest finite range still normalises (no inf - -inf overflow).
        let mut extreme = vec![-f32::MAX, 0.0, f32::MAX];
        normalise_min_max(&mut extreme).unwrap();
        assert_eq!(extreme, vec![0.0, 0.5, 1.0]);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut data: Vec<f32> = (0..256).map(|i| i as f32).collect();
            data[100] = bad;
            let img = GrayImage {
                width: 16,
                height: 16,
                data,
            };
            assert_eq!(
                preprocess(&img, 8).unwrap_err(),
                ScanError::BlankImage,
                "{bad}"
            );
        }
    }

    #[test]
    fn zero_sized_or_inconsistent_images_are_corrupt() {
        let empty = GrayImage {
            width: 0,
            height: 10,
            data: vec![],
        };
        assert_eq!(code_of(preprocess(&empty, 8)), "corrupt_image");
        let short = GrayImage {
            width: 4,
            height: 4,
            data: vec![1.0; 15],
        };
        assert_eq!(code_of(preprocess(&short, 8)), "corrupt_image");
        let ok = GrayImage {
            width: 4,
            height: 4,
            data: (0..16).map(|i| i as f32).collect(),
        };
        assert_eq!(code_of(preprocess(&ok, 0)), "invalid_size");
        // A PNG header announcing zero columns never reaches preprocess.
        assert_eq!(
            code_of(decode(&zero_png(0, 10), &Limits::default())),
            "corrupt_image"
        );
    }

    #[test]
    fn resize_low_pass_filters_instead_of_point_sampling() {
        // A one-pixel checkerboard has mean 0.5 everywhere at coarse scale. Point sampling
        // (nearest) returns only 0s and 1s; a convolution averages to 0.5.
        let n = 64u32;
        let data = (0..n * n).map(|i| ((i % n + i / n) % 2) as f32).collect();
        let img = GrayImage {
            width: n,
            height: n,
            data,
        };
        let out = resize_f32(&img, 16).unwrap();
        for v in out {
            assert!((v - 0.5).abs() < 0.05, "{v}");
        }
        // A step edge survives downsampling in the right place.
        let data = (0..n * n)
            .map(|i| if i % n < n / 2 { 0.0 } else { 100.0 })
            .collect();
        let out = resize_f32(
            &GrayImage {
                width: n,
                height: n,
                data,
            },
            8,
        )
        .unwrap();
        assert!(out[0] < 1.0 && out[7] > 99.0, "{out:?}");
    }

    // ---- DICOM (synthetic) ------------------------------------------------------------------

    #[test]
    fn dicom_native_applies_rescale() {
        let mut dcm = SynthDicom::new(2, 3, vec![0, 10, 20, 30, 40, 50]);
        let img = decode(&dcm.build(), &Limits::default()).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(img.data, vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0]);
        dcm.rescale = Some((-100.0, 2.0));
        let img = decode(&dcm.build(), &Limits::default()).unwrap();
        assert_eq!(img.data, vec![-100.0, -80.0, -60.0, -40.0, -20.0, 0.0]);
    }

    #[test]
    fn dicom_8bit_native_decodes() {
        let mut dcm = SynthDicom::new(3, 3, (0..9).map(|v| v * 25).collect());
        dcm.bits_allocated = 8;
        dcm.bits_stored = 8;
        let img = decode(&dcm.build(), &Limits::default()).unwrap();
        assert_eq!(
            img.data,
            (0..9).map(|v| (v * 25) as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn dicom_window_is_applied_after_rescale() {
        let mut dcm = SynthDicom::new(1, 5, vec![0, 100, 200, 300, 400]);
        dcm.rescale = Some((0.0, 0.5)); // modality values 0, 50, 100, 150, 200
        dcm.window = Some((100.0, 101.0)); // linear window spanning 50..150
        let img = decode(&dcm.build(), &Limits::default()).unwrap();
        assert_eq!(img.data[0], 0.0);
        assert_eq!(img.data[4], 1.0);
        assert!((img.data[2] - 0.5).abs() < 0.01, "{:?}", img.data);
        assert!(img.data[1] <= 0.01 && img.data[3] >= 0.99, "{:?}", img.data);
    }

    #[test]
    fn dicom_monochrome1_is_inverted_to_monochrome2_polarity() {
        let pixels = vec![0, 100, 400, 1000, 4000, 4095];
        let mono2 = SynthDicom::new(2, 3, pixels.clone());
        let mut mono1 = mono2.clone();
        mono1.photometric = "MONOCHROME1";
        let a = decode(&mono2.build(), &Limits::default()).unwrap();
        let b = decode(&mono1.build(), &Limits::default()).unwrap();
        for (x, y) in a.data.iter().zip(&b.data) {
            assert_eq!(
                x + y,
                4095.0,
                "MONOCHROME1 must mirror within the value range"
            );
        }
        let pa = preprocess(&a, 3).unwrap();
        let pb = preprocess(&b, 3).unwrap();
        for (x, y) in pa.iter().zip(&pb) {
            assert!((x + y - 1.0).abs() < 1e-6);
        }
        // With a window, inversion happens after the window (display polarity).
        let mut windowed = mono1.clone();
        windowed.window = Some((2048.0, 4096.0));
        let w = decode(&windowed.build(), &Limits::default()).unwrap();
        assert!(
            w.data[0] > w.data[5],
            "air (low raw value) must end up bright in MONOCHROME1 input"
        );
    }

    #[test]
    fn dicom_implicit_vr_decodes() {
        let mut out = dicom_header(uids::IMPLICIT_VR_LITTLE_ENDIAN);
        implicit_element(&mut out, (0x0008, 0x0060), b"DX");
        implicit_element(&mut out, (0x0028, 0x0002), &us(1));
        implicit_element(&mut out, (0x0028, 0x0004), b"MONOCHROME2 ");
        implicit_element(&mut out, (0x0028, 0x0010), &us(2));
        implicit_element(&mut out, (0x0028, 0x0011), &us(2));
        implicit_element(&mut out, (0x0028, 0x0100), &us(8));
        implicit_element(&mut out, (0x0028, 0x0101), &us(8));
        implicit_element(&mut out, (0x0028, 0x0102), &us(7));
        implicit_element(&mut out, (0x0028, 0x0103), &us(0));
        implicit_element(&mut out, (0x7FE0, 0x0010), &[5, 6, 7, 8]);
        let img = decode(&out, &Limits::default()).unwrap();
        assert_eq!(img.data, vec![5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn dicom_without_pixel_data_is_unsupported() {
        let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        dcm.include_pixel_data = false;
        assert_eq!(
            code_of(decode(&dcm.build(), &Limits::default())),
            "unsupported_dicom"
        );
    }

    #[test]
    fn dicom_unsupported_transfer_syntaxes() {
        for ts in [
            "1.2.840.10008.1.2.4.90",                 // JPEG 2000 lossless
            "1.2.840.10008.1.2.4.80",                 // JPEG-LS
            uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, // deflate: refused on purpose
        ] {
            let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
            dcm.transfer_syntax = ts;
            let err = decode(&dcm.build(), &Limits::default()).unwrap_err();
            assert_eq!(err.code(), "unsupported_dicom", "{ts}: {err}");
        }
        // Junk in the UID field is reported without being echoed.
        let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        dcm.transfer_syntax = "DOE^SECRET";
        let err = decode(&dcm.build(), &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "unsupported_dicom");
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn dicom_unsupported_photometric_and_depth() {
        let mut rgb = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        rgb.photometric = "PALETTE COLOR";
        assert_eq!(
            code_of(decode(&rgb.build(), &Limits::default())),
            "unsupported_dicom"
        );
        let mut deep = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        deep.bits_allocated = 32;
        deep.bits_stored = 32;
        assert_eq!(
            code_of(decode(&deep.build(), &Limits::default())),
            "unsupported_dicom"
        );
        // Bits Stored 0 would trip an assertion deep in the LUT code; it must be an error.
        let mut zero = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        zero.bits_stored = 0;
        assert_eq!(
            code_of(decode(&zero.build(), &Limits::default())),
            "corrupt_image"
        );
    }

    #[test]
    fn dicom_pixel_limit_is_checked_before_decoding() {
        // The header claims 10000x10000; the pixel data is tiny. Decoding would fail as
        // corrupt, so `too_large` proves the check came first.
        let dcm = SynthDicom::new(10_000, 10_000, vec![1, 2, 3, 4]);
        assert_eq!(
            decode(&dcm.build(), &Limits::default()).unwrap_err(),
            ScanError::TooLarge {
                limit: LimitKind::Pixels,
                actual: Some(100_000_000),
                max: DEFAULT_MAX_PIXELS
            }
        );
        let mut short = SynthDicom::new(100, 100, vec![1, 2, 3, 4]);
        short.bits_stored = 12;
        assert_eq!(
            code_of(decode(&short.build(), &Limits::default())),
            "corrupt_image"
        );
    }

    #[test]
    fn dicom_lying_lengths_are_rejected_before_parsing() {
        // An OB element claiming ~4 GiB in a tiny file: the parser would zero-fill 4 GiB.
        let mut file = dicom_header(uids::EXPLICIT_VR_LITTLE_ENDIAN);
        file.extend_from_slice(&[
            0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
        ]);
        file.extend_from_slice(&[0; 64]);
        assert_eq!(code_of(decode(&file, &Limits::default())), "corrupt_image");

        // The same lie nested inside an item of a defined-length sequence.
        let mut inner = Vec::new();
        inner.extend_from_slice(&[
            0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0x7F,
        ]);
        inner.extend_from_slice(&[0; 16]);
        let mut item = Vec::new();
        item.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        item.extend_from_slice(&inner);
        let mut dcm = SynthDicom::new(2, 2, vec![1, 2, 3, 4]);
        assert!(decode(&dcm.build(), &Limits::default()).is_ok());
        element(&mut dcm.extra, (0x0009, 0x1001), b"SQ", &item);
        assert_eq!(
            code_of(decode(&dcm.build(), &Limits::default())),
            "corrupt_image"
        );

        // A lying file meta group length.
        let mut file = SynthDicom::new(2, 2, vec![1, 2, 3, 4]).build();
        file[DICOM_PREAMBLE_LEN + 4 + 8..DICOM_PREAMBLE_LEN + 4 + 12]
            .copy_from_slice(&0x7FFF_FFF0u32.to_le_bytes());
        assert_eq!(code_of(decode(&file, &Limits::default())), "corrupt_image");
    }

    #[test]
    fn dicom_sequences_are_walked_not_rejected() {
        // A well-formed defined-length sequence and an undefined-length one ahead of the image.
        let mut inner = Vec::new();
        element(&mut inner, (0x0008, 0x1150), b"UI", &text("1.2.3", 0));
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        item.extend_from_slice(&inner);
        let mut dcm = SynthDicom::new(1, 2, vec![3, 9]);
        let extra = &mut dcm.extra;
        element(extra, (0x0009, 0x1001), b"SQ", &item);
        extra.extend_from_slice(&[
            0x09, 0x00, 0x02, 0x10, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        extra.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        extra.extend_from_slice(&inner);
        extra.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        extra.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert_eq!(
            decode(&dcm.build(), &Limits::default()).unwrap().data,
            vec![3.0, 9.0]
        );
    }

    #[test]
    fn dicom_errors_never_carry_file_content() {
        let mut dcm = SynthDicom::new(4, 4, ramp(16, 100));
        dcm.patient_name = Some("DOE^SECRETNAME");
        let file = dcm.build();
        assert!(decode(&file, &Limits::default()).is_ok());
        // Every truncation point and a sweep of single-byte corruptions: whatever breaks,
        // no error may echo the file, and nothing may panic out of `decode`.
        let mut variants: Vec<Vec<u8>> = (0..file.len()).map(|cut| file[..cut].to_vec()).collect();
        for at in (DICOM_PREAMBLE_LEN..file.len()).step_by(3) {
            let mut v = file.clone();
            v[at] ^= 0xA5;
            variants.push(v);
        }
        for bytes in &variants {
            if let Err(e) = decode(bytes, &Limits::default()) {
                let text = format!("{e} {e:?}");
                assert!(
                    !text.contains("SECRET") && !text.contains("DOE"),
                    "leaked: {text}"
                );
            }
        }
    }

    #[test]
    fn jpeg_frame_header_is_found() {
        let jpeg = encode_jpeg(40, 24, ExtendedColorType::L8, &gradient8(40, 24));
        assert_eq!(
            jpeg_frame_header(&jpeg),
            Some(JpegFrameHeader {
                width: 40,
                height: 24,
                components: 1
            })
        );
        assert_eq!(jpeg_frame_header(&jpeg[..20]), None);
        assert_eq!(jpeg_frame_header(b"\xFF\xD8\xFF\xD9"), None);
        assert_eq!(jpeg_frame_header(b"not a jpeg"), None);
    }

    // ---- real data ------------------------------------------------------------------------------

    fn cxr_pngs(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for class in ["effusion", "nofinding"] {
            for entry in std::fs::read_dir(dir.join("cxr").join(class)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "png") {
                    files.push(path);
                }
            }
        }
        files.sort();
        files
    }

    #[test]
    fn real_cxr_pngs_preprocess_to_unit_range() {
        let Some(dir) = require_data("real_cxr_pngs_preprocess_to_unit_range") else {
            return;
        };
        let files = cxr_pngs(&dir);
        assert_eq!(
            files.len(),
            110,
            "expected 50 effusion + 60 no-finding PNGs"
        );
        let started = Instant::now();
        for path in &files {
            let bytes = std::fs::read(path).unwrap();
            let out = load_scan(&bytes, &Limits::default(), 256)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(out.len(), 256 * 256);
            assert_eq!(min_max(&out), (0.0, 1.0), "{}", path.display());
        }
        eprintln!(
            "decode+preprocess of {} 1024x1024 PNGs: {:?} per image (test profile)",
            files.len(),
            started.elapsed() / files.len() as u32
        );
    }

    #[test]
    fn real_rgba_pngs_match_their_gray_content() {
        let Some(dir) = require_data("real_rgba_pngs_match_their_gray_content") else {
            return;
        };
        for name in ["effusion/00000100_000.png", "nofinding/00004934_000.png"] {
            let bytes = std::fs::read(dir.join("cxr").join(name)).unwrap();
            let decoder = PngDecoder::new(Cursor::new(&bytes[..])).unwrap();
            assert_eq!(
                decoder.color_type(),
                image::ColorType::Rgba8,
                "{name} is the RGBA sample"
            );
            let rgba = DynamicImage::from_decoder(decoder).unwrap().into_rgba8();
            let img = decode(&bytes, &Limits::default()).unwrap();
            assert_eq!((img.width, img.height), (1024, 1024));
            // Channels are equal, so luminance must reproduce the red channel.
            for (v, p) in img.data.iter().zip(rgba.pixels()).step_by(997) {
                assert!((v - f32::from(p.0[0])).abs() < 1e-3, "{name}");
            }
            let out = preprocess(&img, 256).unwrap();
            assert_eq!(min_max(&out), (0.0, 1.0));
        }
    }

    /// Mean of the lung fields minus mean of the mediastinum strip on a preprocessed image:
    /// central rows, outer thirds (minus a margin for collimation) vs the central tenth.
    /// Negative in display polarity (lungs dark, spine and heart bright).
    fn lung_minus_mediastinum(img: &[f32], size: usize) -> f32 {
        let rows = size * 3 / 10..size * 6 / 10;
        let at = |r: usize, c: usize| img[r * size + c];
        let lungs = rows.clone().flat_map(|r| {
            (size / 8..size / 3)
                .chain(size * 2 / 3..size * 7 / 8)
                .map(move |c| at(r, c))
        });
        let mediastinum = rows.flat_map(|r| (size * 9 / 20..size * 11 / 20).map(move |c| at(r, c)));
        mean(lungs) - mean(mediastinum)
    }

    fn load_real_dicom(dir: &std::path::Path, name: &str) -> GrayImage {
        let bytes = std::fs::read(dir.join("dicom").join(name)).unwrap();
        assert_eq!(detect_format(&bytes), Some(ImageFormat::Dicom), "{name}");
        decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn real_dicoms_decode() {
        let Some(dir) = require_data("real_dicoms_decode") else {
            return;
        };
        for (name, width, height) in [
            ("cr-chest-mono1-10bit.dcm", 440, 440),
            ("dx-chest-mono2-8bit-nofinding.dcm", 1024, 1024),
            ("cr-chest-mono2-8bit-jpegbaseline.dcm", 1024, 1024),
            ("cr-hip-mono2-10bit-jpeglossless.dcm", 1760, 2140),
        ] {
            let started = Instant::now();
            let img = load_real_dicom(&dir, name);
            assert_eq!((img.width, img.height), (width, height), "{name}");
            let out = preprocess(&img, 256).unwrap();
            assert_eq!(min_max(&out), (0.0, 1.0), "{name}");
            eprintln!(
                "{name}: decode+preprocess {:?} (test profile)",
                started.elapsed()
            );
        }
    }

    #[test]
    fn real_monochrome1_has_monochrome2_polarity() {
        let Some(dir) = require_data("real_monochrome1_has_monochrome2_polarity") else {
            return;
        };
        for name in [
            "cr-chest-mono1-10bit.dcm",
            "dx-chest-mono2-8bit-nofinding.dcm",
            "cr-chest-mono2-8bit-jpegbaseline.dcm",
        ] {
            let out = preprocess(&load_real_dicom(&dir, name), 256).unwrap();
            let contrast = lung_minus_mediastinum(&out, 256);
            eprintln!("{name}: lung - mediastinum = {contrast:.3}");
            assert!(
                contrast < -0.05,
                "{name}: lungs must be darker than the mediastinum ({contrast})"
            );
        }
    }

    #[test]
    fn real_dicom_truncations_fail_cleanly() {
        let Some(dir) = require_data("real_dicom_truncations_fail_cleanly") else {
            return;
        };
        for name in [
            "cr-chest-mono1-10bit.dcm",
            "cr-chest-mono2-8bit-jpegbaseline.dcm",
        ] {
            let bytes = std::fs::read(dir.join("dicom").join(name)).unwrap();
            for cut in [
                133,
                200,
                400,
                800,
                1500,
                bytes.len() / 3,
                bytes.len() - 100,
                bytes.len() - 1,
            ] {
                if let Err(e) = decode(&bytes[..cut], &Limits::default()) {
                    assert!(
                        matches!(e.code(), "corrupt_image" | "unsupported_dicom"),
                        "{name}@{cut}: {e}"
                    );
                }
            }
        }
    }

    /// Median timings of the serving path on a real 1024² PNG. Meaningful only in an
    /// optimised build: `CARGO_PROFILE_TEST_OPT_LEVEL=3 cargo test ... -- --ignored`.
    #[test]
    #[ignore = "timing report, run in an optimised build"]
    fn timing_real_png() {
        let Some(dir) = require_data("timing_real_png") else {
            return;
        };
        let bytes = std::fs::read(cxr_pngs(&dir)[0].clone()).unwrap();
        let median = |f: &mut dyn FnMut()| {
            let mut times: Vec<_> = (0..25)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect();
            times.sort();
            times[times.len() / 2]
        };
        let img = decode(&bytes, &Limits::default()).unwrap();
        let d = median(&mut || drop(decode(&bytes, &Limits::default()).unwrap()));
        let p = median(&mut || drop(preprocess(&img, 256).unwrap()));
        let l = median(&mut || drop(load_scan(&bytes, &Limits::default(), 256).unwrap()));
        eprintln!("1024² PNG: decode {d:?}, preprocess to 256² {p:?}, load_scan {l:?}");
        let dcm = std::fs::read(dir.join("dicom/dx-chest-mono2-8bit-nofinding.dcm")).unwrap();
        let t = median(&mut || drop(load_scan(&dcm, &Limits::default(), 256).unwrap()));
        eprintln!("1024² DICOM (implicit LE): load_scan {t:?}");
        let jpg = std::fs::read(dir.join("dicom/cr-chest-mono2-8bit-jpegbaseline.dcm")).unwrap();
        let t = median(&mut || drop(load_scan(&jpg, &Limits::default(), 256).unwrap()));
        eprintln!("1024² DICOM (JPEG baseline): load_scan {t:?}");
    }

    /// Writes preprocessed real scans to /tmp for eyeballing; `cargo test -- --ignored`.
    #[test]
    #[ignore = "writes images to /tmp for manual inspection"]
    fn dump_preprocessed_for_inspection() {
        let Some(dir) = require_data("dump_preprocessed_for_inspection") else {
            return;
        };
        for entry in std::fs::read_dir(dir.join("dicom")).unwrap() {
            let path = entry.unwrap().path();
            let out = load_scan(&std::fs::read(&path).unwrap(), &Limits::default(), 256).unwrap();
            let bytes: Vec<u8> = out.iter().map(|v| (v * 255.0).round() as u8).collect();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            image::GrayImage::from_raw(256, 256, bytes)
                .unwrap()
                .save(format!("/tmp/pleura-{name}.png"))
                .unwrap();
        }
    }
}
