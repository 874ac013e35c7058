use std::process::ExitCode;

fn main() -> ExitCode {
    if let Some(argument) = std::env::args().nth(1) {
        eprintln!(
            "gateway: unexpected argument {argument:?}; the gateway takes none (configure it with APP__... variables)"
        );
        return ExitCode::from(2);
    }
    match actix_web::rt::System::new().block_on(gateway::serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway: {error}");
            ExitCode::FAILURE
        }
    }
}
