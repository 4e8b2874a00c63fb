//! Tests of the scan path, with the fixtures they share: encoders, a PNG bomb
//! built without allocating its pixels, and synthetic DICOM files.

mod dicom;
mod formats;
mod raster;
mod real;
mod resize;

use super::dicom::{jpeg_frame_header, JpegFrameHeader};
use super::format::{DICOM_MAGIC, DICOM_PREAMBLE_LEN, PNG_SIGNATURE};
use super::resize::{normalise_min_max, resize_f32};
use super::*;
use dicom_dictionary_std::uids;
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
