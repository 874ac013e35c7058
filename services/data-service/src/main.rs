use std::process::ExitCode;

const USAGE: &str = "usage: data-service [serve | migrate]
  serve     run the items API (the default)
  migrate   apply pending database migrations, then exit";

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    let outcome = match command.as_deref() {
        None | Some("serve") => run(data_service::serve()),
        Some("migrate") => run(data_service::migrate()),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("data-service: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("data-service: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    command: impl Future<Output = Result<(), Box<dyn std::error::Error>>>,
) -> Result<(), Box<dyn std::error::Error>> {
    actix_web::rt::System::new().block_on(command)
}
