//! A byte-level DICOM writer for the poison corpus: every tag, length and
//! value is written as given, so that files can be missing tags, contradict
//! themselves or lie about lengths, which no DICOM library would write.

/// Transfer syntaxes used by the writer.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
/// Implicit VR little endian.
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR big endian (retired, still decoded).
pub const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
/// JPEG baseline (process 1).
pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";

pub(super) const DICOM_META_HEADER: [u8; 8] = [0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00];
pub(super) const SAMPLES: (u16, u16) = (0x0028, 0x0002);
pub(super) const PHOTOMETRIC: (u16, u16) = (0x0028, 0x0004);
pub(super) const ROWS: (u16, u16) = (0x0028, 0x0010);
pub(super) const COLUMNS: (u16, u16) = (0x0028, 0x0011);
pub(super) const BITS_ALLOCATED: (u16, u16) = (0x0028, 0x0100);
pub(super) const BITS_STORED: (u16, u16) = (0x0028, 0x0101);
pub(super) const HIGH_BIT: (u16, u16) = (0x0028, 0x0102);
pub(super) const PIXEL_REPRESENTATION: (u16, u16) = (0x0028, 0x0103);
pub(super) const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

/// Pixel data: native samples, or encapsulated fragments.
#[derive(Debug, Clone)]
pub(super) enum Pixels {
    Native(Vec<u8>),
    Fragments(Vec<Vec<u8>>),
}

/// The image attributes of a CR object; every field may be set to nonsense.
#[derive(Debug, Clone)]
pub(super) struct DicomImage {
    pub(super) rows: u16,
    pub(super) cols: u16,
    pub(super) samples: u16,
    pub(super) photometric: &'static str,
    pub(super) bits_allocated: u16,
    pub(super) bits_stored: u16,
    pub(super) high_bit: Option<u16>,
    pub(super) window: Option<(f64, f64)>,
    pub(super) pixels: Pixels,
}

impl Default for DicomImage {
    /// A valid 64×64 8-bit MONOCHROME2 gradient.
    fn default() -> Self {
        DicomImage {
            rows: 64,
            cols: 64,
            samples: 1,
            photometric: "MONOCHROME2",
            bits_allocated: 8,
            bits_stored: 8,
            high_bit: None,
            window: None,
            pixels: Pixels::Native((0..64 * 64).map(|i| (i % 64 * 3 + i / 64) as u8).collect()),
        }
    }
}

/// One data element (defined length, or `undefined` for encapsulated pixels).
#[derive(Debug, Clone)]
pub(super) struct El {
    pub(super) tag: (u16, u16),
    pub(super) vr: [u8; 2],
    /// A length to write instead of the value's (a lying header).
    pub(super) len: Option<u32>,
    pub(super) value: Vec<u8>,
    pub(super) undefined: bool,
}

impl El {
    pub(super) fn us(tag: (u16, u16), v: u16) -> El {
        El::raw(tag, *b"US", 0, v.to_le_bytes().to_vec()).honest()
    }

    pub(super) fn text(tag: (u16, u16), vr: [u8; 2], s: &str) -> El {
        let mut value = s.as_bytes().to_vec();
        if value.len() % 2 == 1 {
            value.push(if &vr == b"UI" { 0 } else { b' ' });
        }
        El::raw(tag, vr, 0, value).honest()
    }

    pub(super) fn raw(tag: (u16, u16), vr: [u8; 2], len: u32, value: Vec<u8>) -> El {
        El {
            tag,
            vr,
            len: Some(len),
            value,
            undefined: false,
        }
    }

    pub(super) fn honest(mut self) -> El {
        self.len = None;
        self
    }
}

pub(super) struct Elements(pub(super) Vec<El>);

impl DicomImage {
    pub(super) fn elements(self) -> Elements {
        let mut els = vec![
            El::text((0x0008, 0x0016), *b"UI", "1.2.840.10008.5.1.4.1.1.1"),
            El::text((0x0008, 0x0060), *b"CS", "CR"),
            El::us(SAMPLES, self.samples),
            El::text(PHOTOMETRIC, *b"CS", self.photometric),
            El::us(ROWS, self.rows),
            El::us(COLUMNS, self.cols),
            El::us(BITS_ALLOCATED, self.bits_allocated),
            El::us(BITS_STORED, self.bits_stored),
            El::us(
                HIGH_BIT,
                self.high_bit
                    .unwrap_or_else(|| self.bits_stored.saturating_sub(1)),
            ),
            El::us(PIXEL_REPRESENTATION, 0),
        ];
        if let Some((c, w)) = self.window {
            els.push(El::text((0x0028, 0x1050), *b"DS", &format!("{c}")));
            els.push(El::text((0x0028, 0x1051), *b"DS", &format!("{w}")));
        }
        els.push(match self.pixels {
            Pixels::Native(mut v) => {
                if v.len() % 2 == 1 {
                    v.push(0);
                }
                let vr = if self.bits_allocated > 8 {
                    *b"OW"
                } else {
                    *b"OB"
                };
                El::raw(PIXEL_DATA, vr, 0, v).honest()
            }
            Pixels::Fragments(frags) => {
                // Basic offset table (empty), the fragments, the sequence delimiter.
                let mut v = Vec::new();
                v.extend_from_slice(&tag_bytes((0xFFFE, 0xE000)));
                v.extend_from_slice(&0u32.to_le_bytes());
                for mut f in frags {
                    if f.len() % 2 == 1 {
                        f.push(0);
                    }
                    v.extend_from_slice(&tag_bytes((0xFFFE, 0xE000)));
                    v.extend_from_slice(&(f.len() as u32).to_le_bytes());
                    v.extend_from_slice(&f);
                }
                v.extend_from_slice(&tag_bytes((0xFFFE, 0xE0DD)));
                v.extend_from_slice(&0u32.to_le_bytes());
                El {
                    undefined: true,
                    ..El::raw(PIXEL_DATA, *b"OB", 0, v).honest()
                }
            }
        });
        els.sort_by_key(|e| e.tag);
        Elements(els)
    }
}

pub(super) fn tag_bytes(tag: (u16, u16)) -> [u8; 4] {
    let [a, b] = tag.0.to_le_bytes();
    let [c, d] = tag.1.to_le_bytes();
    [a, b, c, d]
}

pub(super) const LONG_VRS: [&[u8; 2]; 11] = [
    b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV",
];

/// The file meta group (always explicit VR LE) naming `ts`.
pub(super) fn meta_group(ts: &str) -> Vec<u8> {
    let mut meta = Vec::new();
    for el in [
        El::raw((0x0002, 0x0001), *b"OB", 0, vec![0, 1]).honest(),
        El::text((0x0002, 0x0002), *b"UI", "1.2.840.10008.5.1.4.1.1.1"),
        El::text((0x0002, 0x0003), *b"UI", "1.2.826.0.1.3680043.8.498.1"),
        El::text((0x0002, 0x0010), *b"UI", ts),
        El::text((0x0002, 0x0012), *b"UI", "1.2.826.0.1.3680043.8.498"),
    ] {
        write_el(&mut meta, &el, true, false);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&DICOM_META_HEADER);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out
}

pub(super) fn write_el(out: &mut Vec<u8>, el: &El, explicit: bool, big_endian: bool) {
    let u16b = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u32b = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    out.extend_from_slice(&u16b(el.tag.0));
    out.extend_from_slice(&u16b(el.tag.1));
    let len = if el.undefined {
        u32::MAX
    } else {
        el.len.unwrap_or(el.value.len() as u32)
    };
    if explicit {
        out.extend_from_slice(&el.vr);
        if LONG_VRS.contains(&&el.vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&u32b(len));
        } else {
            out.extend_from_slice(&u16b(len as u16));
        }
    } else {
        out.extend_from_slice(&u32b(len));
    }
    // Big endian: numeric values are swapped; pixel bytes are the caller's.
    if big_endian && &el.vr == b"US" {
        for pair in el.value.chunks(2) {
            out.extend(pair.iter().rev());
        }
    } else {
        out.extend_from_slice(&el.value);
    }
}

impl Elements {
    /// A Part 10 file: preamble, `DICM`, meta group naming `ts`, data set in `ts`.
    pub(super) fn file(&self, ts: &str) -> Vec<u8> {
        self.file_with(ts, ts)
    }

    /// As [`file`](Self::file), but the data set is encoded as `data_ts` says,
    /// whatever the meta group claims.
    pub(super) fn file_with(&self, ts: &str, data_ts: &str) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend_from_slice(&meta_group(ts));
        let explicit = data_ts != IMPLICIT_LE;
        let big_endian = data_ts == EXPLICIT_BE;
        for el in &self.0 {
            write_el(&mut out, el, explicit, big_endian);
        }
        out
    }
}

/// Rewrites a `US` element's value in place (explicit or implicit VR LE).
pub(super) fn patch_us(file: &[u8], tag: (u16, u16), value: u16) -> Option<Vec<u8>> {
    let t = tag_bytes(tag);
    let explicit = [t[0], t[1], t[2], t[3], b'U', b'S', 2, 0];
    let implicit = [t[0], t[1], t[2], t[3], 2, 0, 0, 0];
    let at = file
        .windows(8)
        .position(|w| w == explicit || w == implicit)?;
    let mut out = file.to_vec();
    out[at + 8..at + 10].copy_from_slice(&value.to_le_bytes());
    Some(out)
}

/// Rewrites a `CS` element's value in place, padded with spaces to its length.
pub(super) fn patch_cs(file: &[u8], tag: (u16, u16), value: &str) -> Option<Vec<u8>> {
    let t = tag_bytes(tag);
    let at = file.windows(6).position(|w| {
        w[..4] == t && (&w[4..6] == b"CS" || (w[4..6] != [0, 0] && !w[4].is_ascii_uppercase()))
    })?;
    let (len, value_at) = if &file[at + 4..at + 6] == b"CS" {
        (
            u16::from_le_bytes([file[at + 6], file[at + 7]]) as usize,
            at + 8,
        )
    } else {
        (
            u32::from_le_bytes([file[at + 4], file[at + 5], file[at + 6], file[at + 7]]) as usize,
            at + 8,
        )
    };
    if value.len() > len || value_at + len > file.len() {
        return None;
    }
    let mut out = file.to_vec();
    let slot = &mut out[value_at..value_at + len];
    slot.fill(b' ');
    slot[..value.len()].copy_from_slice(value.as_bytes());
    Some(out)
}

/// The same data set behind a file meta group that names `ts`.
pub(super) fn with_transfer_syntax(file: &[u8], ts: &str) -> Option<Vec<u8>> {
    let body = file.get(132..)?;
    if body.get(..8)? != DICOM_META_HEADER {
        return None;
    }
    let group_len = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?) as usize;
    let data_set = body.get(12 + group_len..)?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend_from_slice(&meta_group(ts));
    out.extend_from_slice(data_set);
    Some(out)
}
