//! build/linker, the linker .cargo/config.toml names for x86_64 Linux:
//! for the oauthrelay binary linked by LLD it puts the functions listed in
//! a hot-functions file first, matching Rust names without their hash and
//! telling a generic function's instances apart by size; for anything
//! else it links exactly as `cc` would.
//!
//! Each test links a small C program whose functions carry Rust-style
//! mangled names through the script and reads the layout back with `nm`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Two instances of one generic function (`foo::gen`, same name but for
/// the hash, different sizes) and a local copy LLVM numbered
/// (`foo::copied`) among plain ones.
const PROGRAM: &str = r#"
void copied(void) __asm__("_ZN3foo6copied17h2222222222222222E.1234");
void copied(void) { __asm__ volatile("nop; nop"); }
void _ZN3foo4cold17h0123456789abcdefE(void) { __asm__ volatile("nop"); }
void _ZN3foo3gen17haaaaaaaaaaaaaaaaE(void) { __asm__ volatile("nop"); }
void _ZN3foo3gen17hbbbbbbbbbbbbbbbbE(void) { __asm__ volatile("nop; nop; nop; nop"); }
void _ZN3foo3hot17hfedcba9876543210E(void) { __asm__ volatile("nop"); }
void c_hot(void) { __asm__ volatile("nop"); }
int main(void) {
    copied();
    _ZN3foo4cold17h0123456789abcdefE();
    _ZN3foo3gen17haaaaaaaaaaaaaaaaE();
    _ZN3foo3gen17hbbbbbbbbbbbbbbbbE();
    _ZN3foo3hot17hfedcba9876543210E();
    c_hot();
    return 0;
}
"#;

const COLD: &str = "_ZN3foo4cold17h0123456789abcdefE";
const GEN_A: &str = "_ZN3foo3gen17haaaaaaaaaaaaaaaaE";
const GEN_B: &str = "_ZN3foo3gen17hbbbbbbbbbbbbbbbbE";
const HOT: &str = "_ZN3foo3hot17hfedcba9876543210E";
const COPIED: &str = "_ZN3foo6copied17h2222222222222222E.1234";

/// The functions as `nm` lists them in address order.
const SOURCE_ORDER: [&str; 6] = [COPIED, COLD, GEN_A, GEN_B, HOT, "c_hot"];

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("oauthrelay-linker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        std::fs::write(dir.join("program.c"), PROGRAM).expect("write program.c");
        run(Command::new("cc").current_dir(&dir).args([
            "-c",
            "-O1",
            "-ffunction-sections",
            "program.c",
            "-o",
            "program.o",
        ]));
        Scratch { dir }
    }

    /// Link program.o through build/linker as rustc does for this target
    /// (LLD from the toolchain), with `env` added; the functions in address
    /// order.
    fn link(&self, env: &[(&str, &str)]) -> Vec<String> {
        let linker = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/linker");
        let mut cmd = Command::new(linker);
        cmd.current_dir(&self.dir)
            .env_remove("CARGO_BIN_NAME")
            .env_remove("OAUTHRELAY_HOT_FUNCTIONS")
            .arg("-fuse-ld=lld")
            .arg(format!("-B{}", gcc_ld().display()))
            .args(["program.o", "-o", "program"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd);
        let out = run(Command::new("nm")
            .current_dir(&self.dir)
            .args(["-n", "program"]));
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter(|name| SOURCE_ORDER.contains(name))
            .map(str::to_owned)
            .collect()
    }

    /// A function's size in the object, as `nm -S` prints it (and as
    /// bench/hot-functions.sh writes it).
    fn size(&self, name: &str) -> String {
        let out = run(Command::new("nm").current_dir(&self.dir).args([
            "-S",
            "--defined-only",
            "program.o",
        ]));
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 4 && f[3] == name)
            .map(|f| f[1].to_owned())
            .unwrap_or_else(|| panic!("{name} not in program.o:\n{out}"))
    }

    fn list(&self, lines: &str) -> String {
        let path = self.dir.join("hot-functions.txt");
        std::fs::write(&path, lines).expect("write the list");
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The toolchain's `ld.lld` for `cc -fuse-ld=lld`, where rustc finds it.
fn gcc_ld() -> PathBuf {
    let sysroot = run(Command::new("rustc").args(["--print", "sysroot"]));
    let version = run(Command::new("rustc").arg("-vV"));
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/gcc-ld"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn listed_functions_come_first_whatever_their_hash() {
    let s = Scratch::new("ordered");
    assert_ne!(s.size(GEN_A), s.size(GEN_B));
    // Rust names without their hash or copy number and with their size;
    // the C name as it is.
    let list = s.list(&format!(
        "# comment lines and blank lines are skipped\n\n\
         _ZN3foo3hotE {}\nc_hot\n_ZN3foo3genE {}\n_ZN3foo6copiedE {}\n\
         _ZN3foo9not_thereE 0000000000000010\n",
        s.size(HOT),
        s.size(GEN_B),
        s.size(COPIED),
    ));
    let order = s.link(&[
        ("CARGO_BIN_NAME", "oauthrelay"),
        ("OAUTHRELAY_HOT_FUNCTIONS", &list),
    ]);
    // Only the listed instance of the generic function moves.
    assert_eq!(order, [HOT, "c_hot", GEN_B, COPIED, COLD, GEN_A]);
}

#[test]
fn a_listed_function_whose_size_changed_brings_all_its_instances() {
    let s = Scratch::new("stale");
    let list = s.list("_ZN3foo3genE 00000000000000ff\n");
    let order = s.link(&[
        ("CARGO_BIN_NAME", "oauthrelay"),
        ("OAUTHRELAY_HOT_FUNCTIONS", &list),
    ]);
    let mut first_two = order[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, [GEN_A, GEN_B]);
    assert_eq!(order[2..], [COPIED, COLD, HOT, "c_hot"]);
}

#[test]
fn other_programs_and_a_missing_list_link_as_usual() {
    let s = Scratch::new("plain");
    let list = s.list(&format!("_ZN3foo3hotE {}\nc_hot\n", s.size(HOT)));
    // Another binary (a test, xtask): untouched.
    let order = s.link(&[
        ("CARGO_BIN_NAME", "xtask"),
        ("OAUTHRELAY_HOT_FUNCTIONS", &list),
    ]);
    assert_eq!(order, SOURCE_ORDER);
    // The daemon without a list: links all the same.
    let order = s.link(&[
        ("CARGO_BIN_NAME", "oauthrelay"),
        ("OAUTHRELAY_HOT_FUNCTIONS", "/nonexistent/hot-functions.txt"),
    ]);
    assert_eq!(order, SOURCE_ORDER);
}
