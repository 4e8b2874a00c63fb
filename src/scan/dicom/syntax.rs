//! Transfer syntaxes: which ones are accepted, and how their data sets and
//! pixels are encoded.

use dicom_dictionary_std::uids;

use crate::scan::error::{unsupported_dicom, ScanError};

/// How the pixel data of an accepted transfer syntax is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PixelCodec {
    Native,
    Jpeg,
    Rle,
}

/// Data set encodings of accepted transfer syntaxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DataSetEncoding {
    pub(super) explicit_vr: bool,
    pub(super) big_endian: bool,
}

/// Allow-list of transfer syntaxes whose decoders are compiled in (dicom-pixeldata's pure-Rust
/// `native` set). Checking up front turns "no decoder" into a clear `unsupported_dicom`
/// instead of an opaque decode failure. Deflated data sets are refused on purpose: inflation
/// happens inside the parser, before any limit can be checked (a zip bomb).
pub(super) fn classify_transfer_syntax(
    uid: &str,
) -> Result<(DataSetEncoding, PixelCodec), ScanError> {
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
