//! Placeholder until the report renderer lands.
use super::model::Run;
pub fn html(_title: &str, _runs: &[Run]) -> String {
    String::new()
}
pub fn json_lines(_runs: &[Run]) -> String {
    String::new()
}
pub fn terminal_summary(_runs: &[Run]) -> String {
    String::new()
}
