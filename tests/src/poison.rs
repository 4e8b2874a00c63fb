//! The poison corpus: more than a thousand malformed scan bodies, each with a
//! category and what the fleet must answer, generated here (never downloaded)
//! and the same on every run (seeded).
//!
//! It lives in the test crate because its consumers are tests: the poison
//! test (`tests/tests/poison.rs`) sends it through a real worker, and the
//! `poison_corpus` example writes it out as seeds for `make fuzz`. Sources:
//! phantoms, synthetic DICOM built byte by byte here (so tags can be missing,
//! contradictory or absurd, which no DICOM writer library allows), and,
//! when the real data is there, the real PNG and DICOM samples. The mutations
//! aim at the decode entry point (`pleura::scan::load_scan`): format sniffing,
//! the byte and pixel limits, the PNG/JPEG decoders, the DICOM length walk,
//! transfer syntaxes and pixel tags.
//!
//! Expectations are deliberately of three strengths. `Error(code)` is a
//! property of the input alone (an empty body, an unknown magic, a header
//! past the pixel limit) and must hold exactly. `AnyError` means the input is
//! broken but which check catches it first is the decoder's business.
//! `Either` is a mutation that may still be a valid image (a flipped bit in
//! raw pixels); the test then requires the worker to agree with the library
//! run in-process.

use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

/// What the fleet must answer for a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// An error result with exactly this code.
    Error(&'static str),
    /// An error result, any code.
    AnyError,
    /// Possibly still a valid image: ok or error, as `load_scan` decides.
    Either,
}

/// One malformed body.
#[derive(Debug, Clone)]
pub struct Case {
    /// Category, for the report (`truncate/png`, `bomb/dicom`, ...).
    pub category: String,
    /// What it was derived from (`phantom-png8`, `real-cr-mono1`, ...).
    pub source: String,
    /// The body to submit.
    pub body: Vec<u8>,
    /// What the answer must be.
    pub expect: Expect,
}

/// The corpus and what was left out.
#[derive(Debug)]
pub struct Corpus {
    /// Every case, in a stable order.
    pub cases: Vec<Case>,
    /// Why the real-sample part is missing, when it is.
    pub skipped_real: Option<String>,
}

/// Parameters of the corpus: the limits the worker under test enforces
/// (oversize bodies sit at and just past `max_bytes`; bombs declare more than
/// `max_pixels`), the seed, and where the real samples are.
#[derive(Debug, Clone)]
pub struct Options {
    /// The worker's `max_image_bytes`.
    pub max_bytes: usize,
    /// The worker's `max_image_pixels`.
    pub max_pixels: u64,
    /// Seeds every random choice.
    pub seed: u64,
    /// The real-data folder (`crate::data_dir()`), if any.
    pub data: Option<PathBuf>,
}

/// Generates the corpus.
pub fn generate(opts: &Options) -> Corpus {
    let mut g = Gen {
        rng: SplitMix(opts.seed),
        cases: Vec::new(),
        opts: opts.clone(),
    };
    let sources = synthetic_sources();
    for s in &sources {
        g.truncations(s, 30);
        g.bit_flips(s, 64);
    }
    g.wrong_magic(&sources);
    g.empty_and_tiny();
    g.bombs(&sources);
    g.dicom_tags();
    g.foreign_bodies(220);
    g.oversize(&sources);
    let skipped_real = match &opts.data {
        Some(dir) => match real_sources(dir) {
            Ok(real) => {
                for s in &real {
                    // Big samples get fewer mutants: the corpus is held in memory.
                    let scale = if s.body.len() > 1_000_000 { 4 } else { 1 };
                    g.truncations(s, 24 / scale);
                    g.bit_flips(s, 36 / scale);
                }
                g.real_dicom_tags(&real);
                g.wrong_magic(&real);
                None
            }
            Err(why) => Some(why),
        },
        None => Some("no real data (set PLEURA_DATA)".into()),
    };
    Corpus {
        cases: g.cases,
        skipped_real,
    }
}

// ---- sources -----------------------------------------------------------------------------

/// A valid image a family of mutants derives from.
#[derive(Debug, Clone)]
pub struct Source {
    /// Name in the report.
    pub name: String,
    /// `png`, `jpeg` or `dicom`.
    pub format: &'static str,
    /// The valid body.
    pub body: Vec<u8>,
}

fn phantom_gray(size: u32, seed: u64) -> image::GrayImage {
    pleura_phantom::render(
        pleura_phantom::Finding::Effusion,
        &pleura_phantom::PhantomOptions { size, seed },
    )
}

fn encode_png(w: u32, h: u32, color: ExtendedColorType, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(raw, w, h, color)
        .expect("encode PNG");
    out
}

fn encode_jpeg(w: u32, h: u32, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(raw, w, h, ExtendedColorType::L8)
        .expect("encode JPEG");
    out
}

/// Valid synthetic scans in every container and encoding the decoder takes.
pub fn synthetic_sources() -> Vec<Source> {
    let img = phantom_gray(96, 11);
    let (w, h) = img.dimensions();
    let gray8 = img.as_raw().clone();
    let gray16: Vec<u16> = gray8.iter().map(|&v| u16::from(v) * 4 + 3).collect();
    let rgba8: Vec<u8> = gray8.iter().flat_map(|&v| [v, v, v, 255]).collect();
    let jpeg = encode_jpeg(w, h, &gray8);
    let le16: Vec<u8> = gray16.iter().flat_map(|v| v.to_le_bytes()).collect();
    let be16: Vec<u8> = gray16.iter().flat_map(|v| v.to_be_bytes()).collect();
    let base = DicomImage {
        rows: h as u16,
        cols: w as u16,
        ..DicomImage::default()
    };
    vec![
        Source {
            name: "phantom-png8".into(),
            format: "png",
            body: encode_png(w, h, ExtendedColorType::L8, &gray8),
        },
        Source {
            name: "phantom-png16".into(),
            format: "png",
            body: encode_png(
                w,
                h,
                ExtendedColorType::L16,
                &gray16
                    .iter()
                    .flat_map(|v| v.to_be_bytes())
                    .collect::<Vec<_>>(),
            ),
        },
        Source {
            name: "phantom-png-rgba".into(),
            format: "png",
            body: encode_png(w, h, ExtendedColorType::Rgba8, &rgba8),
        },
        Source {
            name: "phantom-jpeg".into(),
            format: "jpeg",
            body: jpeg.clone(),
        },
        Source {
            name: "synthetic-dicom-explicit16-mono1".into(),
            format: "dicom",
            body: DicomImage {
                photometric: "MONOCHROME1",
                bits_allocated: 16,
                bits_stored: 10,
                pixels: Pixels::Native(le16),
                window: Some((400.0, 700.0)),
                ..base.clone()
            }
            .elements()
            .file(EXPLICIT_LE),
        },
        Source {
            name: "synthetic-dicom-implicit8".into(),
            format: "dicom",
            body: DicomImage {
                pixels: Pixels::Native(gray8),
                ..base.clone()
            }
            .elements()
            .file(IMPLICIT_LE),
        },
        Source {
            name: "synthetic-dicom-bigendian16".into(),
            format: "dicom",
            body: DicomImage {
                bits_allocated: 16,
                bits_stored: 12,
                pixels: Pixels::Native(be16),
                ..base.clone()
            }
            .elements()
            .file(EXPLICIT_BE),
        },
        Source {
            name: "synthetic-dicom-jpeg".into(),
            format: "dicom",
            body: DicomImage {
                pixels: Pixels::Fragments(vec![jpeg]),
                ..base
            }
            .elements()
            .file(JPEG_BASELINE),
        },
    ]
}

/// The real samples: one full-size and one thumbnail radiograph (PNG), the
/// JPEG inside the JPEG-baseline DICOM, and the four DICOM files.
pub fn real_sources(dir: &Path) -> Result<Vec<Source>, String> {
    let first_png = |sub: &str| -> Result<PathBuf, String> {
        let folder = dir.join(sub);
        let mut pngs: Vec<PathBuf> = std::fs::read_dir(&folder)
            .map_err(|e| format!("{}: {e}", folder.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "png"))
            .collect();
        pngs.sort();
        pngs.into_iter()
            .next()
            .ok_or_else(|| format!("no PNG in {}", folder.display()))
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut out = vec![
        Source {
            name: "real-cxr-png".into(),
            format: "png",
            body: read(&first_png("cxr/nofinding")?)?,
        },
        Source {
            name: "real-thumb-png".into(),
            format: "png",
            body: read(&first_png("cxr-thumbs-64/effusion")?)?,
        },
    ];
    for (name, file) in [
        ("real-cr-mono1-10bit", "cr-chest-mono1-10bit.dcm"),
        ("real-dx-implicit-8bit", "dx-chest-mono2-8bit-nofinding.dcm"),
        (
            "real-cr-jpegbaseline",
            "cr-chest-mono2-8bit-jpegbaseline.dcm",
        ),
        (
            "real-cr-jpeglossless",
            "cr-hip-mono2-10bit-jpeglossless.dcm",
        ),
    ] {
        let body = read(&dir.join("dicom").join(file))?;
        if name == "real-cr-jpegbaseline" {
            let jpeg = embedded_jpeg(&body).ok_or("no JPEG fragment in the baseline DICOM")?;
            out.push(Source {
                name: "real-jpeg-from-dicom".into(),
                format: "jpeg",
                body: jpeg,
            });
        }
        out.push(Source {
            name: name.into(),
            format: "dicom",
            body,
        });
    }
    Ok(out)
}

/// The JPEG stream of the first fragment: from the first SOI to the last EOI.
fn embedded_jpeg(dicom: &[u8]) -> Option<Vec<u8>> {
    let start = dicom.windows(3).position(|w| w == [0xFF, 0xD8, 0xFF])?;
    let end = dicom.windows(2).rposition(|w| w == [0xFF, 0xD9])? + 2;
    (end > start).then(|| dicom[start..end].to_vec())
}

// ---- the generator -------------------------------------------------------------------------

/// SplitMix64: tiny, seedable, and enough for choosing offsets.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Gen {
    rng: SplitMix,
    cases: Vec<Case>,
    opts: Options,
}

impl Gen {
    fn push(&mut self, category: impl Into<String>, source: &str, body: Vec<u8>, expect: Expect) {
        self.cases.push(Case {
            category: category.into(),
            source: source.into(),
            body,
            expect,
        });
    }

    /// Prefixes: inside the magic, inside the headers, and spread over the body.
    fn truncations(&mut self, s: &Source, n: usize) {
        let len = s.body.len();
        let mut cuts: Vec<usize> = vec![1, 2, 3, 5, 8, 16, 33, 64, 128, 131, 132, 140, 200, 300];
        for k in 1..n.saturating_sub(cuts.len() + 2).max(1) {
            cuts.push(len * k / n);
        }
        cuts.extend([len - 1, len - 2]);
        cuts.retain(|&c| c > 0 && c < len);
        cuts.sort_unstable();
        cuts.dedup();
        for cut in cuts {
            // A prefix that no longer holds the magic cannot be sniffed; past it the
            // decoder meets the end of the data somewhere, or (PNG/JPEG trailers,
            // DICOM after the pixel data) never needs what was cut.
            let expect = if pleura::scan::detect_format(&s.body[..cut]).is_none() {
                Expect::Error("unsupported_format")
            } else {
                Expect::Either
            };
            self.push(
                format!("truncate/{}", s.format),
                &s.name,
                s.body[..cut].to_vec(),
                expect,
            );
        }
    }

    /// Random bit flips (1 to 8), half of them in the first 512 bytes where the
    /// headers are, and some bytes overwritten with 0x00, 0xFF or noise.
    fn bit_flips(&mut self, s: &Source, n: usize) {
        for i in 0..n {
            let mut body = s.body.clone();
            let span = if i % 2 == 0 {
                body.len().min(512)
            } else {
                body.len()
            };
            let kind = if i % 5 == 4 { "bytes" } else { "bits" };
            for _ in 0..1 + self.rng.below(8) {
                let at = self.rng.below(span);
                if kind == "bits" {
                    body[at] ^= 1 << self.rng.below(8);
                } else {
                    body[at] = [0x00, 0xFF, self.rng.next() as u8][self.rng.below(3)];
                }
            }
            let expect = if pleura::scan::detect_format(&body).is_none() {
                Expect::Error("unsupported_format")
            } else {
                Expect::Either
            };
            self.push(format!("flip-{kind}/{}", s.format), &s.name, body, expect);
        }
    }

    /// Each valid source with its magic damaged in several ways.
    fn wrong_magic(&mut self, sources: &[Source]) {
        for s in sources {
            let mut variants: Vec<Vec<u8>> = Vec::new();
            match s.format {
                "png" => {
                    for at in [0, 1, 4, 7] {
                        let mut b = s.body.clone();
                        b[at] ^= 0x20;
                        variants.push(b);
                    }
                    variants.push(s.body[1..].to_vec());
                }
                "jpeg" => {
                    let mut b = s.body.clone();
                    b[2] = 0x00;
                    variants.push(b);
                    let mut b = s.body.clone();
                    b[0] = 0xFE;
                    variants.push(b);
                    variants.push(s.body[2..].to_vec());
                    let mut b = vec![0u8; 4];
                    b.extend_from_slice(&s.body);
                    variants.push(b);
                }
                _ => {
                    // DICM one byte off, misspelt, or after a preamble of the wrong size.
                    let body = &s.body[132..];
                    let mut b = s.body.clone();
                    b[128..132].copy_from_slice(b"DICN");
                    variants.push(b);
                    let mut b = vec![0u8; 127];
                    b.extend_from_slice(b"DICM");
                    b.extend_from_slice(body);
                    variants.push(b);
                    let mut b = vec![0u8; 129];
                    b.extend_from_slice(b"DICM");
                    b.extend_from_slice(body);
                    variants.push(b);
                    let mut b = b"dicm".to_vec();
                    b.extend_from_slice(body);
                    variants.push(b);
                }
            }
            for body in variants {
                assert!(pleura::scan::detect_format(&body).is_none());
                self.push(
                    format!("wrong-magic/{}", s.format),
                    &s.name,
                    body,
                    Expect::Error("unsupported_format"),
                );
            }
        }
    }

    fn empty_and_tiny(&mut self) {
        self.push("empty", "none", Vec::new(), Expect::Error("empty_body"));
        for tiny in [
            &b"\x89"[..],
            b"\x89PNG",
            b"\x89PNG\r\n\x1a",
            b"\xFF\xD8",
            b"DIC",
            b"\0",
            b" ",
            b"\n",
        ] {
            self.push(
                "tiny",
                "none",
                tiny.to_vec(),
                Expect::Error("unsupported_format"),
            );
        }
        // The bare magic and nothing after it is recognised, then found wanting.
        for magic in [
            &b"\x89PNG\r\n\x1a\n"[..],
            b"\xFF\xD8\xFF",
            b"DICM",
            &DICOM_META_HEADER[..],
        ] {
            self.push("magic-only", "none", magic.to_vec(), Expect::AnyError);
        }
    }

    /// Headers that declare more pixels than `max_pixels` over a few bytes of data,
    /// in every format, and a real zlib bomb that stays within the limit.
    fn bombs(&mut self, sources: &[Source]) {
        let over = (self.opts.max_pixels as f64).sqrt() as u32 + 1;
        let dims: [(u32, u32); 6] = [
            (over, over),
            (65_535, 65_535),
            (100_000, 100_000),
            (1, 0x7FFF_FFFF),
            (0x7FFF_FFFF, 1),
            (0x10_0000, 0x10_0000),
        ];
        let tiny_png = encode_png(4, 4, ExtendedColorType::L8, &[0u8; 16]);
        for (color, depth) in [(0u8, 8u8), (0, 16), (2, 8), (6, 16)] {
            for &(w, h) in &dims {
                let mut b = tiny_png.clone();
                b[16..20].copy_from_slice(&w.to_be_bytes());
                b[20..24].copy_from_slice(&h.to_be_bytes());
                b[24] = depth;
                b[25] = color;
                let crc = crc32(&b[12..29]);
                b[29..33].copy_from_slice(&crc.to_be_bytes());
                self.push("bomb/png", "4x4-png", b, Expect::Error("too_large"));
            }
        }
        // A zlib bomb that is honest about its size: 2000² zeros in a few kB. It
        // decodes, and is then refused for having no contrast.
        let side = 2000u32.min((self.opts.max_pixels as f64).sqrt() as u32);
        let zeros = vec![0u8; (side * side) as usize];
        let b = encode_png(side, side, ExtendedColorType::L8, &zeros);
        self.push(
            "bomb/png-zlib-within-limit",
            "zeros-png",
            b,
            Expect::Error("blank_image"),
        );

        let jpegs: Vec<&Source> = sources.iter().filter(|s| s.format == "jpeg").collect();
        for s in jpegs {
            let sof = sof_offset(&s.body).expect("JPEG has a frame header");
            for (w, h) in [(65_535u16, 65_535u16), (over.min(65_535) as u16, 65_535)] {
                let mut b = s.body.clone();
                b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
                b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
                self.push("bomb/jpeg", &s.name, b, Expect::Error("too_large"));
            }
            // Within the limit but far more than the data: the decoder runs out of data.
            let mut b = s.body.clone();
            b[sof + 5..sof + 7].copy_from_slice(&1500u16.to_be_bytes());
            b[sof + 7..sof + 9].copy_from_slice(&1500u16.to_be_bytes());
            self.push("bomb/jpeg-within-limit", &s.name, b, Expect::Either);
        }

        // DICOM: Rows × Columns past the limit over 16 bytes of pixels, native and JPEG.
        for (rows, cols) in [(65_535u16, 65_535u16), (over.min(65_535) as u16, 65_535)] {
            for ts in [EXPLICIT_LE, IMPLICIT_LE] {
                let body = DicomImage {
                    rows,
                    cols,
                    pixels: Pixels::Native(vec![7; 16]),
                    ..DicomImage::default()
                }
                .elements()
                .file(ts);
                self.push("bomb/dicom", "synthetic", body, Expect::Error("too_large"));
            }
            let mut jpeg = encode_jpeg(8, 8, &[9u8; 64]);
            let sof = sof_offset(&jpeg).expect("SOF");
            jpeg[sof + 5..sof + 7].copy_from_slice(&rows.to_be_bytes());
            jpeg[sof + 7..sof + 9].copy_from_slice(&cols.to_be_bytes());
            let body = DicomImage {
                rows,
                cols,
                pixels: Pixels::Fragments(vec![jpeg.clone()]),
                ..DicomImage::default()
            }
            .elements()
            .file(JPEG_BASELINE);
            self.push(
                "bomb/dicom-jpeg",
                "synthetic",
                body,
                Expect::Error("too_large"),
            );
            // A small DICOM header smuggling the huge JPEG in.
            let body = DicomImage {
                rows: 8,
                cols: 8,
                pixels: Pixels::Fragments(vec![jpeg]),
                ..DicomImage::default()
            }
            .elements()
            .file(JPEG_BASELINE);
            self.push(
                "bomb/dicom-jpeg-smuggled",
                "synthetic",
                body,
                Expect::Error("corrupt_image"),
            );
        }
        // An element length of 4 GiB over a few bytes: the parser would zero-fill it.
        for tag in [(0x0008, 0x0060), (0x0028, 0x0010), (0x7FE0, 0x0010)] {
            let mut els = DicomImage::default().elements();
            els.0.push(El::raw(tag, *b"OB", u32::MAX - 1, vec![0; 8]));
            els.0.sort_by_key(|e| e.tag);
            self.push(
                "bomb/dicom-element-length",
                "synthetic",
                els.file(EXPLICIT_LE),
                Expect::Error("corrupt_image"),
            );
        }
    }

    /// Missing and contradictory pixel tags, absurd bit depths, odd transfer
    /// syntaxes and wrong photometric interpretations, on synthetic DICOM.
    fn dicom_tags(&mut self) {
        let base = DicomImage::default();
        let native = |img: DicomImage| img.elements().file(EXPLICIT_LE);
        let cat = "dicom-tags";
        // Missing tags.
        for (tag, code) in [
            (PIXEL_DATA, "unsupported_dicom"),
            (ROWS, "corrupt_image"),
            (COLUMNS, "corrupt_image"),
            (PHOTOMETRIC, "corrupt_image"),
            (BITS_ALLOCATED, "corrupt_image"),
        ] {
            let mut els = base.clone().elements();
            els.0.retain(|e| e.tag != tag);
            self.push(
                format!("{cat}/missing"),
                "synthetic",
                els.file(EXPLICIT_LE),
                Expect::Error(code),
            );
        }
        for tag in [BITS_STORED, HIGH_BIT, SAMPLES, PIXEL_REPRESENTATION] {
            let mut els = base.clone().elements();
            els.0.retain(|e| e.tag != tag);
            self.push(
                format!("{cat}/missing-optional"),
                "synthetic",
                els.file(EXPLICIT_LE),
                Expect::Either,
            );
        }
        // Absurd bit depths.
        for bits in [0u16, 1, 4, 12, 24, 32, 64, 255, 0xFFFF] {
            self.push(
                format!("{cat}/bits-allocated"),
                "synthetic",
                native(DicomImage {
                    bits_allocated: bits,
                    bits_stored: bits.min(8),
                    ..base.clone()
                }),
                Expect::Error("unsupported_dicom"),
            );
        }
        for stored in [0u16, 9, 16, 17, 0xFFFF] {
            self.push(
                format!("{cat}/bits-stored"),
                "synthetic",
                native(DicomImage {
                    bits_stored: stored,
                    ..base.clone()
                }),
                Expect::Error("corrupt_image"),
            );
        }
        for high in [0u16, 15, 31, 0xFFFF] {
            self.push(
                format!("{cat}/high-bit"),
                "synthetic",
                native(DicomImage {
                    high_bit: Some(high),
                    ..base.clone()
                }),
                Expect::Either,
            );
        }
        // Pixel data that contradicts Rows × Columns × Bits Allocated.
        let px = (base.rows as usize) * (base.cols as usize);
        for len in [0usize, 2, px / 2, px - 2, px + 2, px * 2, px * 4] {
            self.push(
                format!("{cat}/pixel-length"),
                "synthetic",
                native(DicomImage {
                    pixels: Pixels::Native(vec![0x5A; len]),
                    ..base.clone()
                }),
                Expect::Either,
            );
        }
        for (rows, cols) in [
            (0u16, 64u16),
            (64, 0),
            (1, 1),
            (128, 64),
            (64, 128),
            (4096, 1),
        ] {
            let expect = if rows == 0 || cols == 0 {
                Expect::Error("corrupt_image")
            } else {
                Expect::Either
            };
            self.push(
                format!("{cat}/dimensions"),
                "synthetic",
                native(DicomImage {
                    rows,
                    cols,
                    ..base.clone()
                }),
                expect,
            );
        }
        for samples in [0u16, 2, 3, 4] {
            self.push(
                format!("{cat}/samples-per-pixel"),
                "synthetic",
                native(DicomImage {
                    samples,
                    ..base.clone()
                }),
                if samples == 0 {
                    Expect::Either
                } else {
                    Expect::Error("unsupported_dicom")
                },
            );
        }
        // Wrong photometric interpretations.
        for p in [
            "RGB",
            "YBR_FULL",
            "YBR_FULL_422",
            "PALETTE COLOR",
            "MONOCHROME3",
            "monochrome2",
            "ARGB",
            "",
        ] {
            self.push(
                format!("{cat}/photometric"),
                "synthetic",
                native(DicomImage {
                    photometric: p,
                    ..base.clone()
                }),
                if p.is_empty() {
                    Expect::AnyError
                } else {
                    Expect::Error("unsupported_dicom")
                },
            );
        }
        // Odd and refused transfer syntaxes (the data set stays explicit LE).
        for ts in [
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.100",
            "1.2.840.10008.1.2.4.102",
            "1.2.3.4.5.6.7",
            "not a uid",
            "",
            "1.2.840.10008.1.2.1.\u{7f}",
        ] {
            self.push(
                format!("{cat}/transfer-syntax"),
                "synthetic",
                base.clone().elements().file(ts),
                Expect::Error("unsupported_dicom"),
            );
        }
        // A transfer syntax that contradicts the data set's encoding.
        for (ts, data_ts) in [
            (IMPLICIT_LE, EXPLICIT_LE),
            (EXPLICIT_LE, IMPLICIT_LE),
            (EXPLICIT_BE, EXPLICIT_LE),
            (JPEG_BASELINE, EXPLICIT_LE),
            (EXPLICIT_LE, JPEG_BASELINE),
            ("1.2.840.10008.1.2.5", EXPLICIT_LE),
            ("1.2.840.10008.1.2.4.57", EXPLICIT_LE),
        ] {
            let jpeg_pixels = data_ts == JPEG_BASELINE;
            let img = DicomImage {
                pixels: if jpeg_pixels {
                    Pixels::Fragments(vec![encode_jpeg(64, 64, &[100u8; 64 * 64])])
                } else {
                    base.pixels.clone()
                },
                ..base.clone()
            };
            let body = img.elements().file_with(ts, data_ts);
            self.push(
                format!("{cat}/contradictory-syntax"),
                "synthetic",
                body,
                Expect::Either,
            );
        }
        // Encapsulated pixel data that is not what the syntax says.
        for frags in [
            vec![],
            vec![Vec::new()],
            vec![b"not a jpeg".to_vec()],
            vec![vec![0xFF, 0xD8, 0xFF, 0xD9]],
        ] {
            self.push(
                format!("{cat}/fragments"),
                "synthetic",
                DicomImage {
                    pixels: Pixels::Fragments(frags),
                    ..base.clone()
                }
                .elements()
                .file(JPEG_BASELINE),
                Expect::AnyError,
            );
        }
        // Absurd rescale and window values: still an image, or blank.
        for (slope, intercept) in [("0", "0"), ("NaN", "1"), ("1e308", "0"), ("-1", "-1e30")] {
            let mut els = base.clone().elements();
            els.0.push(El::text((0x0028, 0x1052), *b"DS", intercept));
            els.0.push(El::text((0x0028, 0x1053), *b"DS", slope));
            els.0.sort_by_key(|e| e.tag);
            self.push(
                format!("{cat}/rescale"),
                "synthetic",
                els.file(EXPLICIT_LE),
                Expect::Either,
            );
        }
        for (c, w) in [(0.0, 0.0), (1e30, -5.0), (f64::NAN, 10.0), (50.0, 1e-30)] {
            self.push(
                format!("{cat}/window"),
                "synthetic",
                native(DicomImage {
                    window: Some((c, w)),
                    ..base.clone()
                }),
                Expect::Either,
            );
        }
        for frames in ["0", "2", "2147483647", "-1", "x"] {
            let mut els = base.clone().elements();
            els.0.push(El::text((0x0028, 0x0008), *b"IS", frames));
            els.0.sort_by_key(|e| e.tag);
            self.push(
                format!("{cat}/number-of-frames"),
                "synthetic",
                els.file(EXPLICIT_LE),
                Expect::Either,
            );
        }
        // Sequences nested past any real object: 40 levels of SQ > item > SQ.
        const SEQ: (u16, u16) = (0x0040, 0x0275);
        let mut value = Vec::new();
        for _ in 0..40 {
            let mut el = Vec::new();
            el.extend_from_slice(&tag_bytes(SEQ));
            el.extend_from_slice(b"SQ\0\0");
            el.extend_from_slice(&(value.len() as u32).to_le_bytes());
            el.extend_from_slice(&value);
            let mut item = Vec::new();
            item.extend_from_slice(&tag_bytes((0xFFFE, 0xE000)));
            item.extend_from_slice(&(el.len() as u32).to_le_bytes());
            item.extend_from_slice(&el);
            value = item;
        }
        let mut els = base.clone().elements();
        els.0.push(El::raw(SEQ, *b"SQ", 0, value).honest());
        els.0.sort_by_key(|e| e.tag);
        self.push(
            format!("{cat}/deep-sequences"),
            "synthetic",
            els.file(EXPLICIT_LE),
            Expect::Error("corrupt_image"),
        );
    }

    /// Tag patches on the real DICOM files, in place.
    fn real_dicom_tags(&mut self, real: &[Source]) {
        for s in real.iter().filter(|s| s.format == "dicom") {
            let patches: [(&str, (u16, u16), u16, Expect); 9] = [
                ("rows-bomb", ROWS, 65_535, Expect::Error("too_large")),
                ("rows-zero", ROWS, 0, Expect::Error("corrupt_image")),
                ("cols-double", COLUMNS, 0, Expect::Error("corrupt_image")),
                (
                    "bits-allocated",
                    BITS_ALLOCATED,
                    12,
                    Expect::Error("unsupported_dicom"),
                ),
                (
                    "bits-allocated",
                    BITS_ALLOCATED,
                    32,
                    Expect::Error("unsupported_dicom"),
                ),
                (
                    "bits-stored",
                    BITS_STORED,
                    0,
                    Expect::Error("corrupt_image"),
                ),
                (
                    "bits-stored",
                    BITS_STORED,
                    40,
                    Expect::Error("corrupt_image"),
                ),
                ("samples", SAMPLES, 3, Expect::Error("unsupported_dicom")),
                ("high-bit", HIGH_BIT, 40, Expect::Either),
            ];
            for (what, tag, value, expect) in patches {
                if let Some(b) = patch_us(&s.body, tag, value) {
                    self.push(format!("real-dicom-tags/{what}"), &s.name, b, expect);
                }
            }
            if let Some(b) = patch_cs(&s.body, PHOTOMETRIC, "RGB") {
                self.push(
                    "real-dicom-tags/photometric",
                    &s.name,
                    b,
                    Expect::Error("unsupported_dicom"),
                );
            }
            if let Some(b) = patch_cs(&s.body, PHOTOMETRIC, "PALETTE") {
                self.push(
                    "real-dicom-tags/photometric",
                    &s.name,
                    b,
                    Expect::Error("unsupported_dicom"),
                );
            }
            // Another transfer syntax over the same data set.
            for ts in [
                EXPLICIT_LE,
                IMPLICIT_LE,
                EXPLICIT_BE,
                JPEG_BASELINE,
                "1.2.840.10008.1.2.1.99",
                "1.2.840.10008.1.2.4.90",
                "1.2.840.10008.1.2.4.70",
            ] {
                if let Some(b) = with_transfer_syntax(&s.body, ts) {
                    let expect = match ts {
                        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.90" => {
                            Expect::Error("unsupported_dicom")
                        }
                        _ => Expect::Either,
                    };
                    self.push("real-dicom-tags/transfer-syntax", &s.name, b, expect);
                }
            }
        }
    }

    /// Bodies that are not images at all: text, PDF-, ZIP- and other formats'
    /// magic numbers, each with a seeded tail.
    fn foreign_bodies(&mut self, n: usize) {
        let kinds: [(&str, &[u8]); 16] = [
            ("text", b"Patient scan attached, see below.\n"),
            (
                "pdf",
                b"%PDF-1.7\n%\xE2\xE3\xCF\xD3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
            ),
            ("zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00"),
            (
                "zip-empty",
                b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            ),
            ("gzip", b"\x1F\x8B\x08\x00\0\0\0\0\0\x03"),
            ("json", b"{\"image\": \"base64...\", \"patient\": null}"),
            (
                "html",
                b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
            ),
            ("xml", b"<?xml version=\"1.0\"?><scan/>"),
            ("gif", b"GIF89a\x40\x00\x40\x00\xF0\x00\x00"),
            ("bmp", b"BM\x36\x00\x0C\x00\0\0\0\0\x36\0\0\0"),
            ("tiff", b"II*\x00\x08\x00\x00\x00"),
            ("webp", b"RIFF\x24\x00\x00\x00WEBPVP8 "),
            ("jpeg2000", b"\0\0\0\x0CjP  \r\n\x87\n"),
            ("elf", b"\x7FELF\x02\x01\x01\0"),
            ("base64-png", b"iVBORw0KGgoAAAANSUhEUgAA"),
            ("random", b""),
        ];
        for i in 0..n {
            let (kind, prefix) = kinds[i % kinds.len()];
            let mut body = prefix.to_vec();
            let tail = self.rng.below(if i % 7 == 0 { 65_536 } else { 2_048 });
            let printable = matches!(kind, "text" | "json" | "html" | "xml" | "base64-png");
            for _ in 0..tail {
                let r = self.rng.next() as u8;
                body.push(if printable { b' ' + r % 95 } else { r });
            }
            if body.is_empty() {
                body.push(0);
            }
            let expect = if pleura::scan::detect_format(&body).is_none() {
                Expect::Error("unsupported_format")
            } else {
                Expect::AnyError
            };
            self.push(format!("foreign/{kind}"), "none", body, expect);
        }
    }

    /// Bodies of exactly `max_bytes` (accepted by the byte check, then judged on
    /// their content) and of `max_bytes + 1` and more (refused unread).
    fn oversize(&mut self, sources: &[Source]) {
        let max = self.opts.max_bytes;
        let png = &sources[0];
        let dicom = sources
            .iter()
            .find(|s| s.format == "dicom")
            .expect("a DICOM source");
        for (len, at_limit) in [(max, true), (max + 1, false), (max + 4096, false)] {
            // A valid PNG with trailing bytes after IEND, which decoders ignore.
            let mut b = png.body.clone();
            b.resize(len, 0);
            let expect = if at_limit {
                Expect::Either
            } else {
                Expect::Error("too_large")
            };
            self.push("oversize/png-padded", &png.name, b, expect);
            // A valid DICOM with padding after the pixel data, where the parser stops.
            let mut b = dicom.body.clone();
            b.resize(len, 0);
            self.push("oversize/dicom-padded", &dicom.name, b, expect);
            // Noise.
            let b: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ 0x55)
                .collect();
            let expect = if at_limit {
                Expect::Error("unsupported_format")
            } else {
                Expect::Error("too_large")
            };
            self.push("oversize/noise", "none", b, expect);
        }
    }
}

/// CRC-32 (ISO-HDLC), as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Offset of the first SOF marker (FF C0..CF other than C4, C8, CC).
fn sof_offset(jpeg: &[u8]) -> Option<usize> {
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return None;
        }
        let m = jpeg[i + 1];
        if (0xC0..=0xCF).contains(&m) && !matches!(m, 0xC4 | 0xC8 | 0xCC) {
            return Some(i);
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        i += 2 + len;
    }
    None
}

mod dicom_writer;
use dicom_writer::*;
pub use dicom_writer::{EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE};

#[cfg(test)]
mod tests {
    use super::*;
    use pleura::scan::{load_scan, Limits};

    fn opts(data: Option<PathBuf>) -> Options {
        Options {
            max_bytes: 3 << 20,
            max_pixels: 8_000_000,
            seed: 1,
            data,
        }
    }

    /// The sources are valid, or every mutant of them would be meaningless.
    #[test]
    fn sources_decode() {
        let limits = Limits {
            max_bytes: 3 << 20,
            max_pixels: 8_000_000,
        };
        let mut sources = synthetic_sources();
        match crate::data_dir() {
            Some(dir) => sources.extend(real_sources(&dir).expect("real sources")),
            None => crate::skip("poison::sources_decode (real part)", "no real data"),
        }
        for s in sources {
            load_scan(&s.body, &limits, 64).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        }
    }

    /// Exact expectations hold in-process, same seed gives the same corpus, and the
    /// synthetic part alone has a thousand cases.
    #[test]
    fn expectations_hold_in_process() {
        let o = opts(None);
        let limits = Limits {
            max_bytes: o.max_bytes,
            max_pixels: o.max_pixels,
        };
        let corpus = generate(&o);
        assert!(corpus.cases.len() >= 1000, "{} cases", corpus.cases.len());
        let again = generate(&o);
        assert!(corpus
            .cases
            .iter()
            .zip(&again.cases)
            .all(|(a, b)| a.body == b.body && a.category == b.category));
        let mut wrong = Vec::new();
        for c in &corpus.cases {
            let got = load_scan(&c.body, &limits, 32).map_err(|e| e.code());
            let fine = match c.expect {
                Expect::Error(code) => got == Err(code),
                Expect::AnyError => got.is_err(),
                Expect::Either => true,
            };
            if !fine {
                wrong.push(format!(
                    "{} {}: {:?} got {:?}",
                    c.category, c.source, c.expect, got
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} wrong:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
}
