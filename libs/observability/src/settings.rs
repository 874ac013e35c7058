//! Layered configuration, lowest precedence first:
//!
//! 1. the service's `config/base.yaml`, compiled into the binary (so it runs from any
//!    directory and in an image that holds nothing but the binary);
//! 2. `$APP_CONFIG_DIR/$APP_ENV.yaml` when that file exists (`APP_CONFIG_DIR` defaults to
//!    `config`, `APP_ENV` to `local`);
//! 3. environment variables `APP__SECTION__KEY` (`APP__SERVER__PORT=8081`);
//! 4. files named by `APP_FILE__SECTION__KEY` variables: the key's value is the file's
//!    content (without the final newline). Secrets are mounted as files rather than put in
//!    the environment, where `/proc/<pid>/environ`, crash reports and `kubectl describe`
//!    show them.
//!
//! Any error is one line naming the key and what was expected.

use std::collections::HashMap;
use std::path::PathBuf;

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

pub const ENVIRONMENT_VAR: &str = "APP_ENV";
/// Prefix of the variables that name a file holding a key's value.
pub const FILE_VAR_PREFIX: &str = "APP_FILE__";
pub const CONFIG_DIR_VAR: &str = "APP_CONFIG_DIR";
const DEFAULT_ENVIRONMENT: &str = "local";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{ENVIRONMENT_VAR}={0:?} is not a valid environment name (expected letters, digits, '-' or '_')")]
    InvalidEnvironment(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    #[error("invalid configuration: {variable}: cannot read {path}: {reason}")]
    File { variable: String, path: String, reason: String },
}

/// The settings with where they came from.
#[derive(Debug)]
pub struct Loaded<T> {
    pub settings: T,
    pub environment: String,
    /// The files that contributed, for the start-up log line.
    pub files: Vec<String>,
}

/// Loads `T` from `embedded_base` (the YAML text of the service's `config/base.yaml`), the
/// environment's file and the process's `APP__...` variables.
pub fn load<T: DeserializeOwned>(embedded_base: &str) -> Result<Loaded<T>, SettingsError> {
    load_from(embedded_base, std::env::vars().collect())
}

/// [`load`] with the environment given explicitly.
pub fn load_from<T: DeserializeOwned>(
    embedded_base: &str,
    env: HashMap<String, String>,
) -> Result<Loaded<T>, SettingsError> {
    let environment = env.get(ENVIRONMENT_VAR).cloned().unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    if environment.is_empty() || !environment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(SettingsError::InvalidEnvironment(environment));
    }
    let dir = env.get(CONFIG_DIR_VAR).map_or_else(|| PathBuf::from("config"), PathBuf::from);
    let environment_file = dir.join(format!("{environment}.yaml"));

    let mut files = vec!["embedded config/base.yaml".to_owned()];
    let mut builder = Config::builder().add_source(File::from_str(embedded_base, FileFormat::Yaml));
    if environment_file.is_file() {
        files.push(environment_file.display().to_string());
        builder = builder.add_source(File::from(environment_file).format(FileFormat::Yaml));
    }
    let mut from_files = Vec::new();
    for (variable, path) in &env {
        let Some(key) = variable.strip_prefix(FILE_VAR_PREFIX) else { continue };
        let value = std::fs::read_to_string(path).map_err(|error| SettingsError::File {
            variable: variable.clone(),
            path: path.clone(),
            reason: error.to_string(),
        })?;
        from_files.push((key.to_lowercase().replace("__", "."), value.trim_end_matches(['\r', '\n']).to_owned()));
    }
    builder = builder.add_source(
        Environment::with_prefix("APP")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(env.into_iter().filter(|(k, _)| !k.starts_with(FILE_VAR_PREFIX)).collect())),
    );
    for (key, value) in from_files {
        builder = builder.set_override(key, value)?;
    }
    let settings = builder.build()?.try_deserialize()?;
    Ok(Loaded { settings, environment, files })
}

#[cfg(test)]
mod tests {
    use secrecy::{ExposeSecret, SecretString};

    use serde::Deserialize;

    use super::*;
    use crate::server::ServerSettings;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        server: ServerSettings,
        database: Database,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Database {
        url: SecretString,
        pool_size: u32,
    }

    const BASE: &str = "
server: { host: 127.0.0.1, port: 8080, workers: 2 }
database: { url: 'postgres://app:hunter2@localhost/app', pool_size: 8 }
";

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        load_from::<Sample>(BASE, env(pairs)).expect_err("must be rejected").to_string()
    }

    #[test]
    fn embedded_base_then_environment_variables() {
        let loaded =
            load_from::<Sample>(BASE, env(&[("APP__SERVER__PORT", "9000"), ("APP__DATABASE__POOL_SIZE", "3")]))
                .unwrap();
        assert_eq!(loaded.settings.server.port, 9000);
        assert_eq!(loaded.settings.server.host, "127.0.0.1");
        assert_eq!(loaded.settings.database.pool_size, 3);
        assert_eq!(loaded.environment, "local");
    }

    #[test]
    fn environment_file_overrides_base_and_is_overridden_by_variables() {
        let dir = std::env::temp_dir().join(format!("settings-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("staging.yaml"), "server: { port: 7000, workers: 4 }\n").unwrap();
        let dir_str = dir.to_str().unwrap();
        let loaded = load_from::<Sample>(
            BASE,
            env(&[("APP_ENV", "staging"), ("APP_CONFIG_DIR", dir_str), ("APP__SERVER__WORKERS", "1")]),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.environment, "staging");
        assert_eq!(loaded.settings.server.port, 7000);
        assert_eq!(loaded.settings.server.workers, 1);
        assert_eq!(loaded.files.len(), 2);
    }

    #[test]
    fn errors_name_the_key_and_what_was_expected() {
        let error = error_of(&[("APP__SERVER__PORT", "eighty")]);
        assert!(error.contains("server.port"), "{error}");
        assert!(error.contains("u16") || error.contains("integer"), "{error}");
        assert!(!error.contains('\n'), "one line: {error}");

        let error = error_of(&[("APP__SERVER__PORT", "70000")]);
        assert!(error.contains("server.port"), "{error}");

        let error = error_of(&[("APP__SERVER__PROT", "1")]);
        assert!(error.contains("prot"), "{error}");
    }

    #[test]
    fn missing_keys_are_named() {
        let error =
            load_from::<Sample>("server: { host: h, workers: 1 }\ndatabase: { url: u, pool_size: 1 }", env(&[]))
                .expect_err("port is missing")
                .to_string();
        assert!(error.contains("port"), "{error}");
    }

    #[test]
    fn environment_names_cannot_escape_the_config_directory() {
        assert!(error_of(&[("APP_ENV", "../etc/passwd")]).contains("APP_ENV"));
    }

    #[test]
    fn a_value_can_come_from_a_file_named_by_app_file_variables() {
        let file = std::env::temp_dir().join(format!("settings-secret-{}", uuid::Uuid::new_v4()));
        std::fs::write(&file, "postgres://app:from-file@db/app\n").unwrap();
        let path = file.to_str().unwrap();
        let loaded = load_from::<Sample>(
            BASE,
            env(&[("APP_FILE__DATABASE__URL", path), ("APP__DATABASE__URL", "postgres://from-env")]),
        )
        .unwrap();
        assert_eq!(loaded.settings.database.url.expose_secret(), "postgres://app:from-file@db/app", "the file wins");
        let misspelt = error_of(&[("APP_FILE__DATABASE__URLL", path)]);
        std::fs::remove_file(&file).unwrap();
        assert!(misspelt.contains("urll"), "an unknown key is refused, as from any source: {misspelt}");
        assert!(!misspelt.contains("from-file"), "the file's content is never shown: {misspelt}");

        let error = error_of(&[("APP_FILE__DATABASE__URL", "/nonexistent/secret")]);
        assert!(error.contains("APP_FILE__DATABASE__URL") && error.contains("/nonexistent/secret"), "{error}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let loaded = load_from::<Sample>(BASE, env(&[])).unwrap();
        let debug = format!("{:?}", loaded.settings);
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
        assert!(loaded.settings.database.url.expose_secret().contains("hunter2"));
    }
}
