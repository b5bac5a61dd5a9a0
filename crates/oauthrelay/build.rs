//! build/linker reads the code layout list when it links the binary; cargo
//! does not know, so tell it to relink when the list or the script changes.
fn main() {
    println!("cargo::rerun-if-changed=../../build/hot-functions.txt");
    println!("cargo::rerun-if-changed=../../build/linker");
}
