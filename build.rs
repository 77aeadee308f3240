//! Embeds the git revision flowlab is built from as `FLOWLAB_GIT_REV` (empty outside a git
//! checkout), for the `git_rev` column of the results tables: the code that produced a
//! run, wherever the binary runs. `-modified` marks a build from a checkout whose tracked
//! files differ from that revision.

use std::path::Path;
use std::process::Command;

/// `git args…` in the package's folder, its trimmed output when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Rerun when the revision or the sources move, and only then: the sources recompile
    // the crate anyway, and a missing path would rerun this (and rebuild the crate) on
    // every build.
    let head = git(&["rev-parse", "--git-path", "HEAD"]);
    let refs = head.as_deref().and_then(|h| {
        let r = std::fs::read_to_string(h).ok()?;
        let r = r.strip_prefix("ref: ")?.trim().to_string();
        git(&["rev-parse", "--git-path", &r])
    });
    let packed = git(&["rev-parse", "--git-path", "packed-refs"]);
    for p in [head, refs, packed].into_iter().flatten() {
        if Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    for p in ["build.rs", "Cargo.toml", "Cargo.lock", "src", "vendor"] {
        if Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_default();
    let modified = !rev.is_empty()
        && git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let suffix = if modified { "-modified" } else { "" };
    println!("cargo:rustc-env=FLOWLAB_GIT_REV={rev}{suffix}");
}
