//! The `accounts` fixture: a few dozen rows of realistic-looking personal data (names, emails,
//! Luhn-valid test card numbers) for masking, policy and audit tests.

/// One row of the `accounts` table as inserted by [`accounts_sql`].
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub id: i32,
    pub name: String,
    pub email: String,
    pub card_number: String,
    /// Balance in cents (the column is `numeric(12,2)`).
    pub balance_cents: i64,
    /// `created_at` as PostgreSQL prints it with `TimeZone = UTC`.
    pub created_at: String,
}

const FIRST: [&str; 12] = [
    "Alice",
    "Bob",
    "Carmen",
    "Dmitri",
    "Elena",
    "Farid",
    "Grace",
    "Hiroshi",
    "Ines",
    "Jamal",
    "Katarzyna",
    "Liam",
];
const LAST: [&str; 10] = [
    "Johnson", "Okafor", "Garcia", "Ivanov", "Rossi", "Haddad", "Hopper", "Tanaka", "Silva",
    "Nguyen",
];
const DOMAINS: [&str; 4] = [
    "example.com",
    "example.org",
    "mail.example.net",
    "corp.example",
];
/// Issuer prefixes of well-known test card ranges (Visa, Mastercard, Amex-like, Discover).
const CARD_PREFIXES: [&str; 4] = ["4111", "5555", "4012", "6011"];

/// Number of rows in the fixture.
pub const ACCOUNT_ROWS: i32 = 36;

/// The fixture rows, deterministic so tests can compare results with them.
pub fn accounts() -> Vec<Account> {
    (1..=ACCOUNT_ROWS)
        .map(|id| {
            let i = usize::try_from(id).unwrap_or(0);
            let first = FIRST[i % FIRST.len()];
            let last = LAST[(i * 7) % LAST.len()];
            let domain = DOMAINS[i % DOMAINS.len()];
            let email = format!(
                "{}.{}{}@{}",
                first.to_lowercase(),
                last.to_lowercase(),
                id,
                domain
            );
            let prefix = CARD_PREFIXES[i % CARD_PREFIXES.len()];
            // 11 body digits derived from the id, then the Luhn check digit: 16 digits total.
            let body = format!("{prefix}{:011}", (id as u64) * 7_919_113 % 100_000_000_000);
            let card_number = format!("{body}{}", luhn_check_digit(&body));
            let balance_cents = (i64::from(id) * 123_457) % 10_000_000 - 50_000;
            let day = (id - 1) % 28 + 1;
            let created_at = format!(
                "2024-{:02}-{:02} {:02}:{:02}:00+00",
                (id - 1) % 12 + 1,
                day,
                (id * 5) % 24,
                (id * 13) % 60
            );
            Account {
                id,
                name: format!("{first} {last}"),
                email,
                card_number,
                balance_cents,
                created_at,
            }
        })
        .collect()
}

/// The Luhn check digit that makes `digits` + check valid.
pub fn luhn_check_digit(digits: &str) -> u32 {
    let sum: u32 = digits
        .chars()
        .rev()
        .filter_map(|c| c.to_digit(10))
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 0 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// True when `number` (digits only) passes the Luhn check.
pub fn luhn_valid(number: &str) -> bool {
    if number.len() < 2 || !number.chars().all(|c| c.is_ascii_digit()) {
        return false;
    }
    let (body, check) = number.split_at(number.len() - 1);
    check.chars().next().and_then(|c| c.to_digit(10)) == Some(luhn_check_digit(body))
}

fn balance_text(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

impl Account {
    /// The balance as PostgreSQL prints a `numeric(12,2)`.
    pub fn balance_text(&self) -> String {
        balance_text(self.balance_cents)
    }
}

/// SQL that creates and fills `accounts` (run as the superuser in the app database).
pub fn accounts_sql() -> String {
    let mut sql = String::from(
        "CREATE TABLE accounts (\n\
         \x20 id serial PRIMARY KEY,\n\
         \x20 name text NOT NULL,\n\
         \x20 email text NOT NULL UNIQUE,\n\
         \x20 card_number text NOT NULL,\n\
         \x20 balance numeric(12,2) NOT NULL DEFAULT 0,\n\
         \x20 created_at timestamptz NOT NULL DEFAULT now()\n\
         );\n\
         INSERT INTO accounts (id, name, email, card_number, balance, created_at) VALUES\n",
    );
    let rows: Vec<String> = accounts()
        .iter()
        .map(|a| {
            format!(
                "  ({}, '{}', '{}', '{}', {}, '{}')",
                a.id,
                a.name,
                a.email,
                a.card_number,
                a.balance_text(),
                a.created_at
            )
        })
        .collect();
    sql.push_str(&rows.join(",\n"));
    sql.push_str(";\nSELECT setval('accounts_id_seq', (SELECT max(id) FROM accounts));\n");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_known_numbers() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("5555555555554444"));
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid("41111111111a1111"));
    }

    #[test]
    fn fixture_cards_are_luhn_valid_and_unique() {
        let rows = accounts();
        assert_eq!(rows.len(), ACCOUNT_ROWS as usize);
        for a in &rows {
            assert_eq!(a.card_number.len(), 16, "{a:?}");
            assert!(luhn_valid(&a.card_number), "{a:?}");
        }
        let mut emails: Vec<_> = rows.iter().map(|a| a.email.clone()).collect();
        emails.sort();
        emails.dedup();
        assert_eq!(emails.len(), rows.len());
    }

    #[test]
    fn balance_formatting() {
        assert_eq!(balance_text(-50_000), "-500.00");
        assert_eq!(balance_text(5), "0.05");
        assert_eq!(balance_text(123_456), "1234.56");
    }
}
