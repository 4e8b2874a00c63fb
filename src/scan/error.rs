//! [`ScanError`]: why a scan cannot be used, with stable codes.

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

pub(super) fn corrupt(msg: &str) -> ScanError {
    ScanError::CorruptImage(msg.to_owned())
}

pub(super) fn unsupported_dicom(msg: &str) -> ScanError {
    ScanError::UnsupportedDicom(msg.to_owned())
}

/// Which limit a scan exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// [`Limits::max_bytes`](super::Limits::max_bytes), checked against the input length.
    Bytes,
    /// [`Limits::max_pixels`](super::Limits::max_pixels), checked against the header's dimensions.
    Pixels,
    /// The allocation budget derived from [`Limits::max_pixels`](super::Limits::max_pixels) and handed to the decoder,
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
