//! Generates the gRPC code from `zerotune/v1/*.proto` with the vendored protoc (none is installed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=zerotune/v1/coordinator.proto");
    tonic_prost_build::configure().compile_protos(&["zerotune/v1/coordinator.proto"], &["."])?;
    Ok(())
}
