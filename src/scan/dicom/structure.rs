//! Length sanity check of a DICOM stream, run before the real parser.
//!
//! dicom-parser zero-fills a buffer of whatever length an element header claims before it
//! reads the value, so a 200-byte upload claiming a 4 GiB element costs 4 GiB of real memory.
//! This walker mirrors the parser's framing (file meta group, explicit/implicit VR, nested
//! sequences and items, encapsulated pixel fragments, where it stops: the first top-level
//! tag after the pixel data) and rejects any defined length that exceeds the bytes left in
//! its container, and any numeric value of a partial length, after which the parser would
//! read headers this walk never saw. It validates nothing else: other malformations are
//! left to the parser, which then fails without a large allocation. The poison corpus
//! (`tests/tests/poison.rs`) and the `dicom` fuzz target (`fuzz/`) are its adversaries.

use super::syntax::{classify_transfer_syntax, PixelCodec};
use crate::scan::error::{corrupt, ScanError};
use crate::scan::format::{DICOM_MAGIC, DICOM_META_GROUP_LENGTH_HEADER};
use dicom_object::file::ReadPreamble;
use dicom_object::{OpenFileOptions, Tag};

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

/// The size of one value of a numeric VR (1 for every other VR). The parser reads
/// `length / size` whole values of a numeric element but moves its position by the
/// full length, so a remainder leaves it reading the next header a few bytes early:
/// a header this walk never saw, with whatever length those bytes spell (the poison
/// fuzzer found a 2.6 GB allocation that way). Such a length breaks the standard
/// anyway (PS3.5 6.2), so it is refused.
fn numeric_size(vr: &[u8; 2]) -> u32 {
    match vr {
        b"US" | b"SS" | b"OW" => 2,
        b"UL" | b"SL" | b"FL" | b"OF" | b"OL" | b"AT" => 4,
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => 8,
        _ => 1,
    }
}

/// The VR the parser gives `tag` in an implicit VR data set (its dictionary's),
/// found by letting it parse a zero-length `tag` behind the file's own meta group.
fn dictionary_vr(meta: &[u8], tag: (u16, u16)) -> Option<[u8; 2]> {
    let mut stream = Vec::with_capacity(DICOM_MAGIC.len() + meta.len() + 8);
    stream.extend_from_slice(DICOM_MAGIC);
    stream.extend_from_slice(meta);
    stream.extend_from_slice(&tag.0.to_le_bytes());
    stream.extend_from_slice(&tag.1.to_le_bytes());
    stream.extend_from_slice(&0u32.to_le_bytes());
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&stream[..])
        .ok()?;
    let vr = obj.element(Tag(tag.0, tag.1)).ok()?.vr();
    Some(vr.to_bytes())
}

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
        meta: &[],
        pos: 0,
        explicit_vr: true,
        big_endian: false,
    };
    if body.len() < 12 || body[..8] != DICOM_META_GROUP_LENGTH_HEADER {
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
    let transfer_syntax = transfer_syntax.ok_or_else(|| corrupt("missing transfer syntax UID"))?;

    let (encoding, codec) = classify_transfer_syntax(&transfer_syntax)?;
    let mut walker = Walker {
        buf: body,
        meta: &body[..meta_end],
        pos: meta_end,
        explicit_vr: encoding.explicit_vr,
        big_endian: encoding.big_endian,
    };
    walker.data_set(body.len(), 0, true)?;
    Ok(Layout { codec })
}

struct Walker<'a> {
    buf: &'a [u8],
    /// The file meta group (group length included), for asking the parser's
    /// dictionary what an implicit VR element is.
    meta: &'a [u8],
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
    /// at the top level, the first element whose tag sorts after the pixel data
    /// (where the parser, told to read to the pixel data, stops).
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
                if self.u32_at(self.pos + 4) != 0 {
                    return Err(delimiter_length());
                }
                self.pos += 8;
                if top_level {
                    continue; // the parser skips stray delimiters at the top level
                }
                return Ok(());
            }
            // The parser, told to read to the pixel data, stops at the first top-level
            // header whose tag sorts after it, having read the header but not the value.
            // It does not stop at the pixel data itself: an element after it with a lower
            // or equal tag (a second Pixel Data, say) is read, and so must be checked.
            if top_level && tag > PIXEL_DATA {
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
                // Implicit VR: the parser takes the VR from its dictionary, so ask it,
                // but only when the length could matter (no value size divides it).
                let numeric_vr = match vr {
                    None if len % 8 != 0 => dictionary_vr(self.meta, tag),
                    vr => vr,
                };
                if numeric_vr.is_some_and(|vr| len % numeric_size(&vr) != 0) {
                    return Err(corrupt(
                        "DICOM numeric value length is not a multiple of its size",
                    ));
                }
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
                SEQUENCE_DELIMITER if len != 0 => return Err(delimiter_length()),
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
                SEQUENCE_DELIMITER if len != 0 => return Err(delimiter_length()),
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

/// A delimitation item always has length 0. The parser reads the length of
/// one that does not and allocates it (a 343-byte file asked for 3.4 GB):
/// refused before the parser sees it.
fn delimiter_length() -> ScanError {
    corrupt("DICOM delimiter with a non-zero length")
}
