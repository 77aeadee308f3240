//! Datasets: embedded MNIST checksums, splits, corrupt IDX files, PNG folders, parquet
//! files, Fashion-MNIST from Debian's package.

use std::path::Path;

use flowlab::data::{self, idx, mnist, sources};
use flowlab::spec::DataSpec;
use sha2::{Digest, Sha256};

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn embedded_mnist_matches_its_checksums_and_the_vendored_files() {
    let readme = std::fs::read_to_string("data/mnist/README.md").unwrap();
    for (name, bytes, sum) in mnist::EMBEDDED {
        assert_eq!(hex(bytes), sum, "{name}");
        assert_eq!(
            hex(&std::fs::read(Path::new("data/mnist").join(name)).unwrap()),
            sum,
            "{name} on disk"
        );
        assert!(
            readme.contains(sum),
            "data/mnist/README.md lacks the sum of {name}"
        );
    }
    let train = mnist::embedded(mnist::Part::Train).unwrap();
    let test = mnist::embedded(mnist::Part::Test).unwrap();
    assert_eq!(
        (train.len(), test.len(), train.shape),
        (60_000, 10_000, [1, 28, 28])
    );
    assert!(train.labels.iter().all(|&l| l < 10));
    // Canonical first training label is 5.
    assert_eq!(train.labels[0], 5);
}

fn spec(yaml: &str) -> DataSpec {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn default_split_is_50k_10k_deterministic_and_subsets_downscale_classes_apply() {
    let s = data::load(&spec("{dataset: mnist}")).unwrap();
    assert_eq!(
        (s.train.len(), s.val.len(), s.test.len()),
        (50_000, 10_000, 10_000)
    );
    let again = data::load(&spec("{dataset: mnist}")).unwrap();
    assert_eq!(s.val.images, again.val.images);
    let small = data::load(&spec("{dataset: mnist, downscale: 2, val_size: 500, train_subset: 1000, test_subset: 300, classes: [3, 7]}")).unwrap();
    assert_eq!(
        (small.train.len(), small.val.len(), small.test.len()),
        (1000, 500, 300)
    );
    assert_eq!(small.train.shape, [1, 14, 14]);
    assert!(small
        .train
        .labels
        .iter()
        .chain(&small.test.labels)
        .all(|&l| l == 3 || l == 7));
    // A class the data lacks is named, with the classes it has.
    let e = data::load(&spec("{dataset: mnist, classes: [3, 11]}"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no images of class [11]; its classes are [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"),
        "{e}"
    );
}

/// Writes raw IDX image and label files for both MNIST parts into `d`.
fn write_idx_folder(d: &Path, images: &idx::IdxArray, labels: &idx::IdxArray) {
    for part in ["train", "t10k"] {
        std::fs::write(
            d.join(format!("{part}-images-idx3-ubyte")),
            idx::encode(images),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("{part}-labels-idx1-ubyte")),
            idx::encode(labels),
        )
        .unwrap();
    }
}

#[test]
fn corrupt_and_mismatched_idx_folders_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = idx::IdxArray {
        dims: vec![3, 2, 2],
        data: vec![7; 12],
    };
    let labels = idx::IdxArray {
        dims: vec![2],
        data: vec![1, 2],
    };
    write_idx_folder(d, &images, &labels);
    let e = mnist::from_dir("mine", d, mnist::Part::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("3 images but the label file holds dims [2]"),
        "{e}"
    );
    // Truncate the image file: the error names the file and the shortfall.
    let raw = idx::encode(&images);
    std::fs::write(d.join("train-images-idx3-ubyte"), &raw[..raw.len() - 5]).unwrap();
    let e = mnist::from_dir("mine", d, mnist::Part::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("truncated"),
        "{e}"
    );
    let e = mnist::from_dir("mine", &d.join("nope"), mnist::Part::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no train images file in") && e.contains("train-images-idx3-ubyte.gz"),
        "{e}"
    );
    // A good folder works as a `source`.
    let labels3 = idx::IdxArray {
        dims: vec![3],
        data: vec![1, 2, 3],
    };
    write_idx_folder(d, &images, &labels3);
    let (tr, te) = sources::load("mine", d.to_str().unwrap()).unwrap();
    assert_eq!((tr.len(), te.len(), tr.shape), (3, 3, [1, 2, 2]));
}

fn gray_png(w: u32, h: u32, px: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(px).unwrap();
    }
    out
}

#[test]
fn png_folder_round_trip_with_class_subfolders() {
    let dir = tempfile::tempdir().unwrap();
    let mut expect = Vec::new();
    for (class, seed) in [(0u32, 1u8), (4, 9)] {
        let sub = dir.path().join("train").join(class.to_string());
        std::fs::create_dir_all(&sub).unwrap();
        for k in 0..3u8 {
            let px: Vec<u8> = (0..12u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(k))
                .collect();
            std::fs::write(sub.join(format!("img{k}.png")), gray_png(4, 3, &px)).unwrap();
            expect.push((class, px));
        }
    }
    let d = sources::png_dir("pngs", &dir.path().join("train")).unwrap();
    assert_eq!((d.len(), d.shape), (6, [1, 3, 4]));
    for (i, (class, px)) in expect.iter().enumerate() {
        assert_eq!(d.labels[i], *class);
        assert_eq!(d.image(i), px.as_slice());
    }
    // Without a test/ folder, 10% is held out as test.
    let (tr, te) = sources::load("pngs", dir.path().to_str().unwrap()).unwrap();
    assert_eq!((tr.len(), te.len()), (5, 1));
    // Mixed sizes are refused with the offending file named.
    std::fs::write(dir.path().join("train/0/odd.png"), gray_png(5, 3, &[0; 15])).unwrap();
    let e = sources::png_dir("pngs", &dir.path().join("train"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("odd.png") && e.contains("share one shape"),
        "{e}"
    );
}

#[test]
fn parquet_file_of_png_bytes_loads() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let pngs: Vec<Vec<u8>> = (0..10u8)
        .map(|k| gray_png(2, 2, &[k, k + 1, k + 2, k + 3]))
        .collect();
    let labels: Vec<i64> = (0..10).map(|k| k % 3).collect();
    let mut df = DataFrame::new(
        10,
        vec![
            Series::new(
                "image".into(),
                pngs.iter().map(|b| b.as_slice()).collect::<Vec<&[u8]>>(),
            )
            .into_column(),
            Series::new("label".into(), labels.clone()).into_column(),
        ],
    )
    .unwrap();
    let path = dir.path().join("digits.parquet");
    ParquetWriter::new(std::fs::File::create(&path).unwrap())
        .finish(&mut df)
        .unwrap();
    let d = sources::parquet_file("pq", &path).unwrap();
    assert_eq!((d.len(), d.shape), (10, [1, 2, 2]));
    assert_eq!(d.image(7), &[7, 8, 9, 10]);
    assert_eq!(
        d.labels,
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>()
    );
    let e = data::load_parts(&spec(&format!(
        "{{dataset: {{name: pq, source: {}}}}}",
        dir.path().join("missing.parquet").display()
    )))
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not exist"), "{e}");
    // A relative source names the folder it was looked for in.
    let e = data::load_parts(&spec("{dataset: {name: rel, source: no/such/folder}}"))
        .unwrap_err()
        .to_string();
    let cwd = std::env::current_dir().unwrap();
    assert!(
        e.contains(&format!(
            "'no/such/folder' does not exist in {}",
            cwd.display()
        )),
        "{e}"
    );
}

#[test]
fn fashion_mnist_from_debian_package() {
    let dir = Path::new(mnist::FASHION_DIR);
    let required = std::env::var("FLOWLAB_REQUIRE_FASHION").is_ok();
    if !dir.is_dir() {
        assert!(
            !required,
            "FLOWLAB_REQUIRE_FASHION is set but {} is missing",
            dir.display()
        );
        // It falls back to the hub: offline, with an empty cache, never the internet.
        let home = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HUB_OFFLINE", "1");
        std::env::set_var("HF_HOME", home.path());
        let e = data::load_parts(&spec("{dataset: fashion_mnist}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("looked in /usr/share/datasets/fashion-mnist")
                && e.contains("apt-get install dataset-fashion-mnist")
                && e.contains("hf://zalando-datasets/fashion_mnist"),
            "{e}"
        );
        eprintln!("dataset-fashion-mnist is not installed: checked the error message only");
        return;
    }
    let (tr, te) = data::load_parts(&spec("{dataset: fashion_mnist}")).unwrap();
    assert_eq!(
        (tr.len(), te.len(), tr.shape),
        (60_000, 10_000, [1, 28, 28])
    );
    assert!(tr.labels.iter().all(|&l| l < 10));
}
