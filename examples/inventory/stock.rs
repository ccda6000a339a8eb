//! The stock: in memory, or (feature `postgres`) in a Postgres table.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::ApiError;

/// The quantity wanted per SKU.
pub(crate) type Wanted = BTreeMap<String, u64>;

pub(crate) enum Stock {
    Memory(MemoryStock),
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::PgStock),
}

impl Stock {
    /// `initial` of each SKU, in memory.
    pub(crate) fn memory(skus: &[&str], initial: u64) -> Self {
        let stock = skus
            .iter()
            .map(|sku| ((*sku).to_owned(), initial))
            .collect();
        Self::Memory(MemoryStock(Mutex::new(stock)))
    }

    /// The in-memory stock; `None` in Postgres mode, whose deliveries the Postgres handler
    /// applies.
    pub(crate) fn in_memory(&self) -> Option<&MemoryStock> {
        match self {
            Self::Memory(stock) => Some(stock),
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => None,
        }
    }

    /// What is left of each SKU.
    pub(crate) async fn read(&self) -> Result<BTreeMap<String, u64>, ApiError> {
        match self {
            Self::Memory(stock) => Ok(stock.lock().clone()),
            #[cfg(feature = "postgres")]
            Self::Postgres(stock) => stock.read().await.map_err(ApiError::internal),
        }
    }
}

pub(crate) struct MemoryStock(Mutex<BTreeMap<String, u64>>);

impl MemoryStock {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        // Updates are applied only after every check passed, with nothing that can panic in
        // between, so a poisoned lock still guards a consistent map.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `wanted` out of the stock, all or nothing; returns what is left.
    pub(crate) fn apply(&self, wanted: &Wanted) -> Result<BTreeMap<String, u64>, ApiError> {
        let mut stock = self.lock();
        check(&stock, wanted)?;
        for (sku, qty) in wanted {
            if let Some(available) = stock.get_mut(sku) {
                *available -= qty;
            }
        }
        Ok(stock.clone())
    }
}

/// Every SKU wanted is known and has enough stock, or the `422` that says which does not.
pub(crate) fn check(stock: &BTreeMap<String, u64>, wanted: &Wanted) -> Result<(), ApiError> {
    for (sku, qty) in wanted {
        match stock.get(sku) {
            None => return Err(ApiError::unprocessable(format!("unknown SKU {sku:?}"))),
            Some(&available) if available < *qty => {
                return Err(ApiError::unprocessable(format!(
                    "insufficient stock for {sku}: {qty} requested, {available} available"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
