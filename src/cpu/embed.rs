//! Row gather (token embedding, LM-head row selection): `out[r, :] = table[ids[r], :]`.
use rayon::prelude::*;

/// Copies row `ids[r]` of `table` (`[table_rows, row_len]`, row-major) into row `r` of `out`
/// (`[ids.len(), row_len]`). Ids are validated upstream; an out-of-range id panics here.
pub fn gather_rows(table: &[f32], row_len: usize, ids: &[u32], out: &mut [f32]) {
    assert!(
        row_len > 0 && table.len().is_multiple_of(row_len),
        "gather_rows: table is not [rows, {row_len}]"
    );
    assert_eq!(
        out.len(),
        ids.len() * row_len,
        "gather_rows: out is not [{}, {row_len}]",
        ids.len()
    );
    let table_rows = table.len() / row_len;
    out.par_chunks_mut(row_len)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            let id = id as usize;
            assert!(
                id < table_rows,
                "gather_rows: id {id} >= table rows {table_rows}"
            );
            o.copy_from_slice(&table[id * row_len..(id + 1) * row_len]);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_in_id_order() {
        let table = [0.5, -1.5, 2.25, 3.75, -4.5, 5.125];
        let mut out = [f32::NAN; 8];
        gather_rows(&table, 2, &[2, 0, 2, 1], &mut out);
        assert_eq!(out, [-4.5, 5.125, 0.5, -1.5, -4.5, 5.125, 2.25, 3.75]);
    }

    #[test]
    #[should_panic(expected = "id 3 >= table rows 3")]
    fn rejects_out_of_range_id() {
        let table = [0.5f32; 6];
        let mut out = [0.0; 2];
        gather_rows(&table, 2, &[3], &mut out);
    }
}
