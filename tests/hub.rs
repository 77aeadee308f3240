//! The Hugging Face hub path end to end, against a hub-shaped HTTP server on 127.0.0.1
//! that this test starts and fills itself (never the internet). One test per binary:
//! it sets HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE for the whole process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use polars::prelude::*;

fn gray_png(px: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 3, 2);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(px).unwrap();
    }
    out
}

/// A parquet shard in the hub's layout: `image` = struct {bytes, path}, `label` = int64.
fn shard(n: u8, offset: u8) -> Vec<u8> {
    let pngs: Vec<Vec<u8>> = (0..n).map(|k| gray_png(&[k + offset; 6])).collect();
    let bytes = Series::new(
        "bytes".into(),
        pngs.iter().map(|b| b.as_slice()).collect::<Vec<&[u8]>>(),
    );
    let paths = Series::new(
        "path".into(),
        (0..n).map(|k| format!("{k}.png")).collect::<Vec<_>>(),
    );
    let image = StructChunked::from_series("image".into(), n as usize, [bytes, paths].iter())
        .unwrap()
        .into_series();
    let label = Series::new(
        "label".into(),
        (0..n as i64).map(|k| k % 10).collect::<Vec<_>>(),
    );
    let mut df =
        DataFrame::new(n as usize, vec![image.into_column(), label.into_column()]).unwrap();
    let mut out = Vec::new();
    ParquetWriter::new(&mut out).finish(&mut df).unwrap();
    out
}

/// Serves `files` like huggingface.co does for hf-hub: the repo info API and `resolve`
/// downloads with Range support. Stops by itself after 60 s or 200 connections.
fn serve(
    repo: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while Instant::now() < deadline && served < 200 {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            served += 1;
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range_start = None;
            loop {
                let mut hline = String::new();
                if reader.read_line(&mut hline).is_err() || hline.trim().is_empty() {
                    break;
                }
                if let Some(v) = hline.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = v
                        .trim()
                        .split('-')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok());
                }
            }
            let mut s = stream;
            let info_path = format!("/api/datasets/{repo}/revision/main");
            let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path == info_path {
                let siblings: Vec<String> = files
                    .iter()
                    .map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}"))
                    .collect();
                (
                    "200 OK",
                    vec!["Content-Type: application/json".into()],
                    format!(
                        "{{\"siblings\":[{}],\"sha\":\"c0ffee\"}}",
                        siblings.join(",")
                    )
                    .into_bytes(),
                )
            } else if let Some((_, data)) = files
                .iter()
                .find(|(f, _)| path == format!("/datasets/{repo}/resolve/main/{f}"))
            {
                let start = range_start.unwrap_or(0).min(data.len());
                let end = data.len();
                let body = data[start..end].to_vec();
                (
                    "206 Partial Content",
                    vec![
                        format!("ETag: \"etag-{}\"", data.len()),
                        "X-Repo-Commit: c0ffee".into(),
                        format!(
                            "Content-Range: bytes {start}-{}/{}",
                            end.saturating_sub(1),
                            data.len()
                        ),
                    ],
                    body,
                )
            } else {
                ("404 Not Found", vec![], b"not found".to_vec())
            };
            let mut resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for h in headers {
                resp.push_str(&h);
                resp.push_str("\r\n");
            }
            resp.push_str("\r\n");
            let _ = s.write_all(resp.as_bytes());
            let _ = s.write_all(&body);
            let _ = s.flush();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 64];
            let _ = s.read(&mut sink);
        }
    });
    (addr, hits)
}

#[test]
fn hub_dataset_downloads_into_the_cache_then_loads_offline() {
    let home = tempfile::tempdir().unwrap();
    for v in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
    ] {
        std::env::remove_var(v);
    }
    std::env::set_var("NO_PROXY", "127.0.0.1,localhost");
    std::env::set_var("HF_HOME", home.path());

    // Offline with an empty cache: a clear error naming the cache.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = flowlab::data::sources::load("tiny", "hf://flowlab-test/tiny-digits")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE is set") && e.contains(&home.path().display().to_string()),
        "{e}"
    );
    std::env::remove_var("HF_HUB_OFFLINE");

    let (addr, hits) = serve(
        "flowlab-test/tiny-digits",
        vec![
            ("data/train-00000-of-00001.parquet", shard(12, 0)),
            ("data/test-00000-of-00001.parquet", shard(5, 100)),
        ],
    );
    std::env::set_var("HF_ENDPOINT", &addr);
    let (train, test) =
        flowlab::data::sources::load("tiny", "hf://flowlab-test/tiny-digits").unwrap();
    assert_eq!((train.len(), test.len(), train.shape), (12, 5, [1, 2, 3]));
    assert_eq!(train.image(3), &[3; 6]);
    assert_eq!(test.image(2), &[102; 6]);
    assert_eq!(train.labels[11], 1);
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the loopback hub was not used"
    );
    // The files are in hf-hub's standard cache under HF_HOME.
    assert!(home
        .path()
        .join("hub/datasets--flowlab-test--tiny-digits")
        .is_dir());

    // Offline: read from the cache, no request made.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let before = hits.load(std::sync::atomic::Ordering::SeqCst);
    let (train2, test2) =
        flowlab::data::sources::load("tiny", "hf://flowlab-test/tiny-digits").unwrap();
    assert_eq!((train2.images, test2.images), (train.images, test.images));
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), before);
}
