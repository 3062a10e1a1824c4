//! Per-request costs of body validation and response masking.
//!
//! Run briefly with: `cargo bench --bench body -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use palisade_policy::body::BodySchema;
use palisade_policy::masking::ResponseMask;

const PAYMENT_SCHEMA: &str = r##"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "additionalProperties": false,
  "required": ["id", "amount", "currency", "card", "billing", "items"],
  "properties": {
    "id": {"type": "string", "format": "uuid"},
    "amount": {"type": "integer", "minimum": 1, "maximum": 100000000},
    "currency": {"enum": ["EUR", "USD", "GBP", "CHF"]},
    "description": {"type": "string", "maxLength": 200},
    "card": {
      "type": "object",
      "required": ["number", "expiry", "holder"],
      "properties": {
        "number": {"type": "string", "pattern": "^[0-9]{12,19}$"},
        "expiry": {"type": "string", "pattern": "^(0[1-9]|1[0-2])/[0-9]{2}$"},
        "cvc": {"type": "string", "pattern": "^[0-9]{3,4}$"},
        "holder": {"type": "string", "minLength": 1, "maxLength": 100}
      }
    },
    "billing": {"$ref": "#/$defs/address"},
    "shipping": {"$ref": "#/$defs/address"},
    "items": {
      "type": "array",
      "minItems": 1,
      "maxItems": 50,
      "items": {
        "type": "object",
        "required": ["sku", "quantity", "unit_price"],
        "properties": {
          "sku": {"type": "string", "pattern": "^[A-Z0-9-]{3,20}$"},
          "quantity": {"type": "integer", "minimum": 1},
          "unit_price": {"type": "integer", "minimum": 0}
        }
      }
    },
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}}
  },
  "$defs": {
    "address": {
      "type": "object",
      "required": ["line1", "city", "postal_code", "country"],
      "properties": {
        "line1": {"type": "string"},
        "line2": {"type": "string"},
        "city": {"type": "string"},
        "postal_code": {"type": "string"},
        "country": {"type": "string", "pattern": "^[A-Z]{2}$"}
      }
    }
  }
}"##;

const PAYMENT_BODY: &str = r#"{
  "id": "67e55044-10b1-426f-9247-bb680e5fe0c8",
  "amount": 15990,
  "currency": "EUR",
  "description": "Order 2024-000123 for customer 98765, express delivery",
  "card": {"number": "4111111111111111", "expiry": "09/28", "cvc": "123", "holder": "Ada Lovelace"},
  "billing": {"line1": "12 Analytical Row", "line2": "Flat 3", "city": "London", "postal_code": "NW1 2AB", "country": "GB"},
  "shipping": {"line1": "12 Analytical Row", "line2": "Flat 3", "city": "London", "postal_code": "NW1 2AB", "country": "GB"},
  "items": [
    {"sku": "BOOK-0001", "quantity": 1, "unit_price": 4990},
    {"sku": "BOOK-0002", "quantity": 2, "unit_price": 3000},
    {"sku": "PEN-0042", "quantity": 5, "unit_price": 400},
    {"sku": "GIFT-WRAP", "quantity": 1, "unit_price": 1000}
  ],
  "metadata": {"channel": "web", "campaign": "spring-sale", "session": "b1946ac92492d2347c6235b4d2611184"}
}"#;

/// A ~2 KB account listing with a card number per entry.
fn account_response() -> String {
    let accounts: Vec<String> = (0..8)
        .map(|i| {
            format!(
                r#"{{"id": "acct_{i:04}", "name": "Account holder {i}", "status": "active",
                    "card": {{"number": "41111111111111{i:02}", "brand": "visa", "expiry": "0{}/29"}},
                    "balance": {}, "iban": "GB82WEST123456987654{i:02}"}}"#,
                i % 9 + 1,
                1000 * i + 17
            )
        })
        .collect();
    format!(
        r#"{{"owner": {{"email": "ada@example.com", "ssn": "123-45-6789", "api_key": "sk_live_abcdef0123456789"}},
            "accounts": [{}], "page": {{"next": null, "size": 8}}}}"#,
        accounts.join(",")
    )
}

fn validation(c: &mut Criterion) {
    let schema = match BodySchema::compile(PAYMENT_SCHEMA) {
        Ok(schema) => schema,
        Err(e) => panic!("benchmark schema must compile: {e}"),
    };
    assert_eq!(schema.validate(PAYMENT_BODY.as_bytes()), Ok(()));
    let invalid = PAYMENT_BODY.replace("\"amount\": 15990", "\"amount\": 0");

    let mut group = c.benchmark_group("body");
    group.throughput(Throughput::Bytes(PAYMENT_BODY.len() as u64));
    group.bench_function("validate_payment_valid", |b| {
        b.iter(|| schema.validate(black_box(PAYMENT_BODY.as_bytes())))
    });
    group.bench_function("validate_payment_invalid", |b| {
        b.iter(|| schema.validate(black_box(invalid.as_bytes())))
    });
    group.bench_function("compile_payment_schema", |b| {
        b.iter(|| BodySchema::compile(black_box(PAYMENT_SCHEMA)))
    });
    group.finish();
}

fn masking(c: &mut Criterion) {
    let response = account_response();
    let rules = match ResponseMask::compile(
        &["/owner/ssn".to_owned(), "/owner/api_key".to_owned()],
        &[("/accounts/*/card/number".to_owned(), 4)],
    ) {
        Ok(rules) => rules,
        Err(e) => panic!("benchmark pointers must compile: {e}"),
    };
    assert!(matches!(rules.apply(response.as_bytes()), Ok(Some(_))));
    let untouched = match ResponseMask::compile(&["/nothing/here".to_owned()], &[]) {
        Ok(rules) => rules,
        Err(e) => panic!("benchmark pointers must compile: {e}"),
    };

    let mut group = c.benchmark_group("masking");
    group.throughput(Throughput::Bytes(response.len() as u64));
    group.bench_function("mask_accounts_3_pointers", |b| {
        b.iter(|| rules.apply(black_box(response.as_bytes())))
    });
    group.bench_function("no_match_parse_only", |b| {
        b.iter(|| untouched.apply(black_box(response.as_bytes())))
    });
    group.finish();
}

criterion_group!(benches, validation, masking);
criterion_main!(benches);
