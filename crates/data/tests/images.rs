//! Image readers on files written by the test (IDX plain and gzipped, CIFAR-10 and
//! CIFAR-100 binary batches), every malformed file a named error, flipped batches, and
//! the installed Fashion-MNIST when it is there (required where
//! `SCOREGUIDE_REQUIRE_DATA=1`, as in CI).

use scoreguide_data::images::{flip_rng, read_idx, FASHION_MNIST_SYSTEM_DIR};
use scoreguide_data::{cifar, fashion_mnist, mnist_format, ImageSplit};
use std::io::Write;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scoreguide-images-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn idx(dims: &[u32], values: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(values);
    b
}

fn write(path: &Path, bytes: &[u8]) {
    if path.extension().is_some_and(|e| e == "gz") {
        let f = std::fs::File::create(path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap();
    } else {
        std::fs::write(path, bytes).unwrap();
    }
}

/// Three 2 × 2 images of pixels 23·i mod 256; labels 0, 9, 4.
fn write_mnist(dir: &Path, gz: bool) {
    let ext = if gz { ".gz" } else { "" };
    let pixels: Vec<u8> = (0..12).map(|i| (i * 23 % 256) as u8).collect();
    write(
        &dir.join(format!("t10k-images-idx3-ubyte{ext}")),
        &idx(&[3, 2, 2], &pixels),
    );
    write(
        &dir.join(format!("t10k-labels-idx1-ubyte{ext}")),
        &idx(&[3], &[0, 9, 4]),
    );
}

#[test]
fn idx_files_plain_and_gzipped() {
    for gz in [false, true] {
        let dir = scratch(if gz { "gz" } else { "plain" });
        write_mnist(&dir, gz);
        let set = mnist_format(&dir, ImageSplit::Test, "test set").unwrap();
        assert_eq!(
            (set.len(), set.channels, set.size, set.classes),
            (3, 1, 2, 10)
        );
        assert_eq!(set.labels, vec![0, 9, 4]);
        let v = set
            .images
            .tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, x) in v.iter().enumerate() {
            let p = (i * 23 % 256) as f32;
            assert!((x - (p / 127.5 - 1.0)).abs() < 1e-6);
        }
    }
}

#[test]
fn malformed_idx_files_are_named_errors() {
    let dir = scratch("bad");
    let mut wrong_type = idx(&[2, 2, 2], &[0; 8]);
    wrong_type[2] = 0x0D;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "bad magic"),
        (wrong_type, "element type"),
        (idx(&[2, 2], &[0; 4]), "rank 2"),
        (idx(&[2, 2, 2], &[0; 7]), "holds 7"),
        (vec![0, 0, 8, 3, 0, 0], "truncated"),
        (idx(&[u32::MAX, u32::MAX, u32::MAX], &[]), "overflow"),
    ];
    for (bytes, expected) in cases {
        let path = dir.join("bad-idx3-ubyte");
        std::fs::write(&path, &bytes).unwrap();
        let err = read_idx(&path, 3).unwrap_err().to_string();
        assert!(
            err.contains("bad-idx3-ubyte") && err.contains(expected),
            "{err}"
        );
    }
    // A gzip file that is not gzip.
    let path = dir.join("broken.gz");
    std::fs::write(&path, b"not gzip").unwrap();
    assert!(read_idx(&path, 3)
        .unwrap_err()
        .to_string()
        .contains("broken.gz"));
    // Labels out of range, and label and image counts that disagree.
    write(
        &dir.join("t10k-images-idx3-ubyte"),
        &idx(&[2, 2, 2], &[0; 8]),
    );
    write(&dir.join("t10k-labels-idx1-ubyte"), &idx(&[2], &[1, 12]));
    let err = mnist_format(&dir, ImageSplit::Test, "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 12"), "{err}");
    write(&dir.join("t10k-labels-idx1-ubyte"), &idx(&[3], &[1, 2, 3]));
    let err = mnist_format(&dir, ImageSplit::Test, "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 labels for the 2 images"), "{err}");
}

#[test]
fn a_missing_data_set_says_where_it_looked_and_how_to_install_it() {
    let dir = scratch("empty");
    let err = fashion_mnist(Some(&dir), ImageSplit::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(
        err.contains("apt-get install dataset-fashion-mnist"),
        "{err}"
    );
    let err = cifar(&dir, false, ImageSplit::Test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("test_batch.bin"), "{err}");
}

#[test]
fn cifar_batches() {
    let dir = scratch("cifar");
    // CIFAR-10: one label byte per record; CIFAR-100: coarse then fine.
    let record = |label: &[u8], fill: u8| -> Vec<u8> {
        let mut r = label.to_vec();
        r.extend((0..3072).map(|i| fill.wrapping_add((i % 7) as u8)));
        r
    };
    std::fs::write(
        dir.join("test_batch.bin"),
        [record(&[3], 0), record(&[7], 100)].concat(),
    )
    .unwrap();
    std::fs::write(
        dir.join("test.bin"),
        [record(&[1, 42], 5), record(&[2, 99], 9)].concat(),
    )
    .unwrap();
    let ten = cifar(&dir, false, ImageSplit::Test).unwrap();
    assert_eq!(
        (ten.len(), ten.channels, ten.size, ten.classes),
        (2, 3, 32, 10)
    );
    assert_eq!(ten.labels, vec![3, 7]);
    let hundred = cifar(&dir, true, ImageSplit::Test).unwrap();
    assert_eq!(
        (hundred.classes, hundred.labels.clone()),
        (100, vec![42, 99])
    );
    std::fs::write(dir.join("test_batch.bin"), vec![0u8; 3074]).unwrap();
    let err = cifar(&dir, false, ImageSplit::Test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3073-byte records"), "{err}");
}

#[test]
fn flipped_batches_mirror_each_line_and_follow_the_seed() {
    let dir = scratch("flip");
    write_mnist(&dir, false);
    let set = mnist_format(&dir, ImageSplit::Test, "t").unwrap();
    let rows = |flip: bool, seed: u64| {
        let idx = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2];
        let (x, y) = set.batch(&idx, flip, &mut flip_rng(seed, 3)).unwrap();
        (x.to_vec2::<f32>().unwrap(), y.to_vec1::<u32>().unwrap())
    };
    let (plain, labels) = rows(false, 0);
    assert_eq!(labels, vec![0, 9, 4, 0, 9, 4, 0, 9, 4, 0, 9, 4]);
    let (flipped, _) = rows(true, 0);
    assert_eq!(flipped, rows(true, 0).0, "same seed, same flips");
    let mut changed = 0;
    for (a, b) in plain.iter().zip(&flipped) {
        let mirrored = vec![a[1], a[0], a[3], a[2]];
        assert!(*b == *a || *b == mirrored);
        changed += usize::from(b != a);
    }
    assert!(
        changed > 0 && changed < plain.len(),
        "some rows flip, not all: {changed}"
    );
}

#[test]
fn installed_fashion_mnist() {
    let required = std::env::var("SCOREGUIDE_REQUIRE_DATA").is_ok_and(|v| v == "1");
    if !required && !Path::new(FASHION_MNIST_SYSTEM_DIR).is_dir() {
        eprintln!("Fashion-MNIST is not installed here; skipped (CI requires it)");
        return;
    }
    let test = fashion_mnist(None, ImageSplit::Test).unwrap();
    assert_eq!((test.len(), test.size, test.classes), (10_000, 28, 10));
    for c in 0..10 {
        let n = test.labels.iter().filter(|&&l| l == c).count();
        assert_eq!(n, 1000, "class {c}");
    }
    let train = fashion_mnist(None, ImageSplit::Train).unwrap();
    assert_eq!(train.len(), 60_000);
}
