//! Source checks for the determinism rules that the compiler cannot enforce: code that runs in
//! simulation must not draw randomness that madsim does not seed.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `tokio::select!` without `biased;` polls its branches in an order drawn from tokio's own
/// thread-local RNG, which madsim does not seed: two runs of one seed diverge.
#[test]
fn every_select_in_simulated_code_is_biased() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("sim/src"), &mut files);
    let mut offenders = Vec::new();
    for f in files
        .iter()
        .filter(|f| !f.to_string_lossy().contains("/src/bin/"))
    {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains("select! {") && lines.get(i + 1).is_none_or(|n| n.trim() != "biased;")
            {
                offenders.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(files.len() > 10, "scanned the sources");
    assert!(
        offenders.is_empty(),
        "unbiased select! in simulated code: {offenders:?}"
    );
}

/// `tokio::sync::watch` picks which waiters to wake with tokio's unseeded RNG; simulated code
/// uses broadcast channels or its own latest-value cells instead.
#[test]
fn no_tokio_watch_channel_in_simulated_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("sim/src"), &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.to_string_lossy().contains("/src/bin/"))
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains("sync::watch"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "tokio::sync::watch in simulated code: {offenders:?}"
    );
}
