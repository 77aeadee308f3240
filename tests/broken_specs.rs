//! Every file in tests/specs/broken/ must be refused with the messages its `# expect:`
//! lines state (substrings, in order), each error starting with `file:line:column`,
//! and never a panic.

use std::path::Path;

use flowlab::data::builtin_shape;
use flowlab::spec::Experiment;

fn check(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let expects: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .collect();
    if expects.is_empty() {
        return Err(format!("{}: no '# expect:' line", path.display()));
    }
    let label = format!("broken/{}", path.file_name().unwrap().to_string_lossy());
    let outcome = std::panic::catch_unwind(|| {
        Experiment::from_text(&text, &label, "broken", &[])
            .and_then(|e| e.runs(&[], &builtin_shape).map(|_| ()))
    });
    let msg = match outcome {
        Err(_) => return Err(format!("{label}: panicked")),
        Ok(Ok(())) => return Err(format!("{label}: was accepted")),
        Ok(Err(e)) => e.to_string(),
    };
    for line in msg.lines() {
        let rest = line
            .strip_prefix(&format!("{label}:"))
            .ok_or_else(|| format!("{label}: error line does not start with the file: {line}"))?;
        let mut it = rest.splitn(3, ':');
        let (l, c) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
        if l.parse::<usize>().is_err() || c.parse::<usize>().is_err() {
            return Err(format!("{label}: error has no line:column: {line}"));
        }
    }
    for e in expects {
        if !msg.contains(e) {
            return Err(format!(
                "{label}: expected\n    {e}\n  got\n    {}",
                msg.replace('\n', "\n    ")
            ));
        }
    }
    Ok(())
}

#[test]
fn broken_specs_give_located_specific_errors() {
    let dir = Path::new("tests/specs/broken");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "the corpus needs at least 15 broken specs"
    );
    let failures: Vec<String> = files.iter().filter_map(|f| check(f).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} broken specs misreported:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
