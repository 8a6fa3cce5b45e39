//! Model outputs (TorchScript `IValue`s) → one JSON value per instance.
//!
//! A tensor is split along its first (batch) dimension. A tuple or list of batch-first
//! tensors gives each instance a list (one entry per element); a dict with string keys gives
//! each instance an object. These nest. Anything without a batch dimension (a number, a
//! string, a list of strings) cannot be split per instance and is an error naming what the
//! model returned.

use serde_json::{Map, Value};
use tch::{Device, IValue, TchError, Tensor};

use super::decode::tensor_to_json;
use crate::session::SessionError;

/// The model's output as one JSON value per instance of a batch of `rows`.
pub fn batch_rows(output: &IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
    rows_of(output, rows).map_err(|e| match e {
        SessionError::OutputForm(_) => SessionError::OutputForm(format!(
            "the model returned {}, which cannot be split into one answer per instance; a \
             handler that serves it must return tensors (or tuples, lists or dicts of tensors) \
             whose first dimension is the batch",
            describe(output)
        )),
        other => other,
    })
}

fn rows_of(output: &IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
    match output {
        IValue::Tensor(t) => tensor_rows(t, rows),
        IValue::Tuple(items) | IValue::GenericList(items) => {
            let columns = items
                .iter()
                .map(|v| rows_of(v, rows))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(transpose(columns, rows)
                .into_iter()
                .map(Value::Array)
                .collect())
        }
        IValue::TensorList(items) => {
            let columns = items
                .iter()
                .map(|t| tensor_rows(t, rows))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(transpose(columns, rows)
                .into_iter()
                .map(Value::Array)
                .collect())
        }
        IValue::GenericDict(entries) => {
            let mut keys = Vec::with_capacity(entries.len());
            let mut columns = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let IValue::String(k) = k else {
                    return Err(SessionError::OutputForm(format!(
                        "the model returned a dict whose keys are {}, not strings",
                        describe(k)
                    )));
                };
                keys.push(k.clone());
                columns.push(rows_of(v, rows)?);
            }
            Ok(transpose(columns, rows)
                .into_iter()
                .map(|row| Value::Object(keys.iter().cloned().zip(row).collect::<Map<_, _>>()))
                .collect())
        }
        other => Err(SessionError::OutputForm(format!(
            "the model returned {}, which has no batch dimension to split into one answer per \
             instance; a handler that serves it must return tensors (or tuples, lists or dicts \
             of tensors) whose first dimension is the batch",
            describe(other)
        ))),
    }
}

/// The model's output when the handler needs exactly one tensor.
pub fn single_tensor(output: IValue) -> Result<Tensor, SessionError> {
    match output {
        IValue::Tensor(t) => Ok(t),
        other => Err(SessionError::OutputForm(format!(
            "the model returned {}, where this handler needs one tensor",
            describe(&other)
        ))),
    }
}

/// A short description of an `IValue`, for messages.
pub fn describe(v: &IValue) -> String {
    match v {
        IValue::None => "None".into(),
        IValue::Tensor(t) => match shape_of(t) {
            Ok(shape) => format!("a tensor of shape {shape:?}"),
            Err(_) => "a tensor without a shape (undefined, or of a layout without sizes)".into(),
        },
        IValue::Double(_) => "a float".into(),
        IValue::Int(_) => "an int".into(),
        IValue::Bool(_) => "a bool".into(),
        IValue::Tuple(items) => format!("a tuple of {}", items.len()),
        IValue::IntList(_) => "a list of ints".into(),
        IValue::DoubleList(_) => "a list of floats".into(),
        IValue::BoolList(_) => "a list of bools".into(),
        IValue::String(_) => "a string".into(),
        IValue::StringList(_) => "a list of strings".into(),
        IValue::TensorList(items) => format!("a list of {} tensors", items.len()),
        IValue::GenericList(items) => match items.first() {
            Some(IValue::String(_)) => "a list of strings".into(),
            _ => format!("a list of {}", items.len()),
        },
        IValue::GenericDict(_) => "a dict".into(),
        IValue::Object(_) => "a TorchScript object".into(),
        IValue::Device(_) => "a device".into(),
        _ => "a value of another TorchScript type".into(),
    }
}

/// A tensor's shape, with libtorch's errors as values: `Tensor::size` panics on an undefined
/// tensor or one whose layout has no sizes (a nested tensor, say), which a model may return.
pub fn shape_of(t: &Tensor) -> Result<Vec<i64>, TchError> {
    if !t.defined() {
        return Err(TchError::Shape("the tensor is undefined".into()));
    }
    crate::libtorch::sizes(t)
}

/// A tensor's element count (see [`shape_of`]).
pub fn numel_of(t: &Tensor) -> Result<usize, TchError> {
    shape_of(t)?
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| TchError::Shape("the tensor's element count does not fit".into()))
}

/// A tensor's device, with libtorch's error as a value (`Tensor::device` panics on an
/// undefined tensor).
pub fn device_of(t: &Tensor) -> Result<Device, TchError> {
    if !t.defined() {
        return Err(TchError::Shape("the tensor is undefined".into()));
    }
    Ok(t.device())
}

fn tensor_rows(t: &Tensor, rows: usize) -> Result<Vec<Value>, SessionError> {
    if shape_of(t)?.is_empty() {
        return Err(SessionError::OutputForm(
            "the model returned a 0-dimensional tensor, which has no batch dimension".into(),
        ));
    }
    match tensor_to_json(t)? {
        Value::Array(items) if items.len() == rows => Ok(items),
        Value::Array(items) => Err(SessionError::BatchMismatch {
            sent: rows,
            got: items.len(),
        }),
        _ => Err(SessionError::BatchMismatch { sent: rows, got: 0 }),
    }
}

/// `columns[c][r]` → `rows[r][c]`.
fn transpose(columns: Vec<Vec<Value>>, rows: usize) -> Vec<Vec<Value>> {
    let mut out: Vec<Vec<Value>> = (0..rows)
        .map(|_| Vec::with_capacity(columns.len()))
        .collect();
    for column in columns {
        for (r, v) in column.into_iter().enumerate() {
            if let Some(row) = out.get_mut(r) {
                row.push(v);
            }
        }
    }
    out
}
