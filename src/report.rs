//! Tables for people: what the CLI prints (queue depths, DLQ stats, demo
//! summaries), rendered with `comfy-table`, one function per table.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{CellAlignment, Table};

use crate::broker::topology::QueueInfo;

/// A table with a header row and right-aligned numeric columns.
pub fn table(header: &[&str], numeric: &[usize], rows: Vec<Vec<String>>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for &i in numeric {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// `topology show`.
pub fn queues(queues: &[QueueInfo]) -> Table {
    table(
        &["queue", "role", "messages", "consumers"],
        &[2, 3],
        queues
            .iter()
            .map(|q| {
                vec![
                    q.name.clone(),
                    q.role.clone(),
                    q.messages.to_string(),
                    q.consumers.to_string(),
                ]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_queue_depths() {
        let out = queues(&[QueueInfo {
            name: "mm.send".into(),
            role: "work".into(),
            messages: 12,
            consumers: 2,
        }])
        .to_string();
        assert!(out.contains("mm.send") && out.contains("12") && out.contains("consumers"));
    }
}
