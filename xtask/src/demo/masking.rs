//! Demo step for masking (issue #6): the same SELECT as the agent identity and as an identity
//! exempt from masking; the agent never sees a raw e-mail address or card number.

use anyhow::{Result, bail};
use interceptor_tests::Interceptor;
use interceptor_tests::fixtures::{self, Account};
use interceptor_tests::pg::APP_DB;

use super::psql;

/// The agent identity: policy `demo` masks what it reads.
pub const AGENT: &str = "demo";
/// In group `auditors`, which the policy's `[mask] exempt_groups` names.
pub const EXEMPT: &str = "auditor";
pub const EXEMPT_GROUP: &str = "auditors";

/// Rows 1-3 of the fixture, with an alias on the masked column: the rule follows the column's
/// origin, not its name in the result.
const SQL: &str =
    "SELECT id, name, email AS contact, card_number FROM accounts ORDER BY id LIMIT 3";
const ROWS: usize = 3;

pub fn run(n: usize, proxy: &Interceptor) -> Result<()> {
    println!("\n-- {n}. Masking: the same query as the agent and as an exempt auditor");
    println!(
        "   Policy `demo` masks `public.accounts.email` (column rule, partial: the domain stays) \
         and every card number in any text value (content detector, Luhn-checked, partial: the \
         last 4 digits stay). The masking happens inside interceptor, so the agent's client \
         never receives the raw values. Group `{EXEMPT_GROUP}` is exempt."
    );
    println!("   As the agent `{AGENT}`:");
    let agent = psql::run_shown_ok(&proxy.params(AGENT).dbname(APP_DB), SQL)?;
    println!("   As `{EXEMPT}` (group `{EXEMPT_GROUP}`), same policy, same query:");
    let exempt = psql::run_shown_ok(&proxy.params(EXEMPT).dbname(APP_DB), SQL)?;
    let rows: Vec<Account> = fixtures::accounts().into_iter().take(ROWS).collect();
    check(&agent.stdout, &exempt.stdout, &rows)?;
    println!(
        "   checked: the agent got the {ROWS} rows with no raw e-mail address or card number; \
         the auditor got them in clear"
    );
    Ok(())
}

/// The agent's output holds each row, masked (name in clear, e-mail domain and the card's last
/// four digits only); the exempt output holds the raw values.
pub fn check(agent: &str, exempt: &str, rows: &[Account]) -> Result<()> {
    for a in rows {
        if !agent.contains(&a.name) {
            bail!(
                "the agent's output lacks row {} ({}):\n{agent}",
                a.id,
                a.name
            );
        }
        for raw in [&a.email, &a.card_number] {
            if agent.contains(raw.as_str()) {
                bail!("raw value {raw} reached the agent:\n{agent}");
            }
            if !exempt.contains(raw.as_str()) {
                bail!("the exempt identity did not get {raw} in clear:\n{exempt}");
            }
        }
        let domain = a.email.split_once('@').map_or("", |(_, d)| d);
        if !agent.contains(&format!("@{domain}")) {
            bail!(
                "the agent's output lacks the masked e-mail of row {}:\n{agent}",
                a.id
            );
        }
        let last4 = &a.card_number[a.card_number.len().saturating_sub(4)..];
        if !agent.contains(&format!("*{last4}")) {
            bail!(
                "the agent's output lacks the masked card of row {}:\n{agent}",
                a.id
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Account {
        fixtures::accounts().remove(0)
    }

    fn masked(a: &Account) -> String {
        let domain = a.email.split_once('@').unwrap().1;
        format!(
            " {} | {} | ***@{domain} | ************{}",
            a.id,
            a.name,
            &a.card_number[12..]
        )
    }

    fn clear(a: &Account) -> String {
        format!(" {} | {} | {} | {}", a.id, a.name, a.email, a.card_number)
    }

    #[test]
    fn masked_agent_and_clear_auditor_pass() {
        let a = row();
        check(&masked(&a), &clear(&a), &[a]).unwrap();
    }

    #[test]
    fn a_raw_value_for_the_agent_fails() {
        let a = row();
        let leaked_card = format!("{} {}", masked(&a), a.card_number);
        assert!(check(&leaked_card, &clear(&a), std::slice::from_ref(&a)).is_err());
        let leaked_email = format!("{} {}", masked(&a), a.email);
        assert!(check(&leaked_email, &clear(&a), std::slice::from_ref(&a)).is_err());
    }

    #[test]
    fn masked_output_for_the_auditor_fails() {
        let a = row();
        assert!(check(&masked(&a), &masked(&a), std::slice::from_ref(&a)).is_err());
    }

    #[test]
    fn missing_rows_or_values_fail() {
        let a = row();
        // Nothing at all (e.g. everything withheld) is not "masked".
        assert!(check("(0 rows)", &clear(&a), std::slice::from_ref(&a)).is_err());
        // Masked to NULL instead of the partial form the policy asks for.
        let nulled = format!(" {} | {} |  | ", a.id, a.name);
        assert!(check(&nulled, &clear(&a), std::slice::from_ref(&a)).is_err());
    }
}
