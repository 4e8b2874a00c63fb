//! DICOM: CR and DX radiographs, native or JPEG-compressed.
//!
//! The pixel data goes through the modality LUT (rescale), then the VOI
//! transformation (VOI LUT, else the first window), and MONOCHROME1 is
//! inverted to MONOCHROME2 polarity, in that explicit order. The stream's
//! lengths are checked by [`structure`] before the DICOM parser sees it,
//! because the parser zero-fills whatever length an element header claims.
//! Patient attributes are never read.

mod structure;
mod syntax;

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::{
    ConvertOptions, DecodedPixelData, ModalityLutOption, PhotometricInterpretation, PixelDecoder,
    VoiLutFunction, VoiLutOption, WindowLevel, WindowLevelTransform,
};

use self::syntax::PixelCodec;
use super::error::{corrupt, unsupported_dicom, ScanError};
use super::format::{dicom_body, DICOM_MAGIC};
use super::gray::GrayImage;
use super::limits::{check_pixels, Limits};

pub(in crate::scan) fn decode_dicom(bytes: &[u8], limits: &Limits) -> Result<GrayImage, ScanError> {
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
pub(in crate::scan) struct JpegFrameHeader {
    pub(in crate::scan) width: u16,
    pub(in crate::scan) height: u16,
    pub(in crate::scan) components: u8,
}

/// Finds the first SOFn segment of a JPEG stream and returns its frame dimensions.
pub(in crate::scan) fn jpeg_frame_header(data: &[u8]) -> Option<JpegFrameHeader> {
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
