//! Which container a scan is, from its magic bytes alone (never its name:
//! uploads are routinely misnamed).

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

pub(super) const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
const JPEG_SOI: [u8; 3] = [0xFF, 0xD8, 0xFF];
pub(super) const DICOM_MAGIC: &[u8; 4] = b"DICM";
pub(super) const DICOM_PREAMBLE_LEN: usize = 128;
/// `(0002,0000) UL 4`: the File Meta Information Group Length element in explicit VR little
/// endian, which the DICOM parser requires as the first meta element. A stream that starts
/// with it is a Part 10 file whose preamble and magic were stripped (some PACS exports do so).
pub(super) const DICOM_META_GROUP_LENGTH_HEADER: [u8; 8] =
    [0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00];

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

/// Returns the bytes that follow the `DICM` magic (or the whole input for a bare meta group),
/// i.e. what the DICOM parser reads once the magic is put back in front.
pub(super) fn dicom_body(bytes: &[u8]) -> Option<&[u8]> {
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
