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
            let mut decoder =
                JpegDecoder::new(Cursor::new(bytes)).map_err(|e| map_image_error(e, "JPEG", limits))?;
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
    let range = max - min;
    let scale = min.abs().max(max.abs()).max(1.0);
    if !(range > BLANK_RELATIVE_EPSILON * scale) {
        return Err(ScanError::BlankImage);
    }
    // Division (not multiplication by 1/range) so that the maximum maps to exactly 1.0.
    for v in values.iter_mut() {
        *v = (*v - min) / range;
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
        DynamicImage::ImageLumaA8(b) => b.as_raw().chunks_exact(2).map(|p| f32::from(p[0])).collect(),
        DynamicImage::ImageLumaA16(b) => {
            b.as_raw().chunks_exact(2).map(|p| f32::from(p[0])).collect()
        }
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
    const EXPLICIT_LE: DataSetEncoding = DataSetEncoding { explicit_vr: true, big_endian: false };
    match uid {
        uids::IMPLICIT_VR_LITTLE_ENDIAN => Ok((
            DataSetEncoding { explicit_vr: false, big_endian: false },
            PixelCodec::Native,
        )),
        uids::EXPLICIT_VR_LITTLE_ENDIAN => Ok((EXPLICIT_LE, PixelCodec::Native)),
        uids::EXPLICIT_VR_BIG_ENDIAN => Ok((
            DataSetEncoding { explicit_vr: true, big_endian: true },
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
        // The UID is a public registry identifier, not patient data, and names the codec a
        // site would need; keep it (bounded) in the message.
        other => Err(ScanError::UnsupportedDicom(format!(
            "transfer syntax {} has no decoder",
            other.chars().take(64).collect::<String>()
        ))),
    }
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
    let layout = structure::check(body)?;
    let (_, codec) = classify_transfer_syntax(&layout.transfer_syntax)?;

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
    // radiograph this model can read.
    if uint(tags::SAMPLES_PER_PIXEL).unwrap_or(1) != 1 {
        return Err(unsupported_dicom("more than one sample per pixel"));
    }
    let bits_allocated = uint(tags::BITS_ALLOCATED).ok_or_else(|| corrupt("missing Bits Allocated"))?;
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
        let frame = jpeg_frame_header(first).ok_or_else(|| corrupt("JPEG fragment has no frame header"))?;
        if (u32::from(frame.width), u32::from(frame.height)) != (cols, rows) || frame.components != 1 {
            return Err(corrupt("JPEG frame header disagrees with Rows/Columns"));
        }
    }

    // Multi-frame: the first frame only. Decoding one frame also keeps memory at one frame.
    let decoded = obj
        .decode_pixel_data_frame(0)
        .map_err(|_| corrupt("pixel data could not be decoded"))?;
    if !decoded.photometric_interpretation().is_monochrome() {
        return Err(unsupported_dicom("photometric interpretation is not monochrome"));
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
            let index = (v.round() as i64).saturating_sub(first_input).clamp(0, last);
            *v = f32::from(lut.data[index as usize]);
        }
        return;
    }
    let window = decoded.window().ok().flatten().and_then(|w| w.first().copied());
    // A window with a non-finite centre or a non-positive width is a broken header; the
    // modality values are then the best available image, and min-max normalisation follows.
    if let Some(window) = window.filter(|w| w.center.is_finite() && w.width.is_finite() && w.width > 0.0) {
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
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
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
    use super::{classify_transfer_syntax, corrupt, ScanError};

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
        pub(super) transfer_syntax: String,
    }

    fn too_long() -> ScanError {
        corrupt("DICOM element length exceeds the available data")
    }

    /// Checks `body` (the bytes after the `DICM` magic) and returns its transfer syntax.
    pub(super) fn check(body: &[u8]) -> Result<Layout, ScanError> {
        // The file meta group is always explicit VR little endian and must open with its
        // group length, which is how the parser finds where the data set starts.
        let mut meta = Walker { buf: body, pos: 0, explicit_vr: true, big_endian: false };
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

        let (encoding, _) = classify_transfer_syntax(&transfer_syntax)?;
        let mut walker = Walker {
            buf: body,
            pos: meta_end,
            explicit_vr: encoding.explicit_vr,
            big_endian: encoding.big_endian,
        };
        walker.data_set(body.len(), 0, true)?;
        Ok(Layout { transfer_syntax })
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
            if self.big_endian { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) }
        }

        fn u32_at(&self, at: usize) -> u32 {
            let b = [self.buf[at], self.buf[at + 1], self.buf[at + 2], self.buf[at + 3]];
            if self.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
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
mod tests {}
