//! build/linker reads the code layout list when it links the binary; cargo
//! does not know, so tell it to relink when the list or the script changes.

// A build script talks to cargo on stdout; a closed stdout here is cargo's
// problem to report, not ours (src/out.rs's outln! is for the binary).
#![allow(clippy::disallowed_macros)]

fn main() {
    println!("cargo::rerun-if-changed=../../build/hot-functions.txt");
    println!("cargo::rerun-if-changed=../../build/linker");
}
