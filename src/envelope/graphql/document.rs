//! What kind of operation a GraphQL document asks for: parsed with
//! `graphql-parser` (chosen by measurement over `apollo-parser`:
//! BENCHMARKS.md, "Twelfth pass"), and only to find the selected
//! operation's type. Anything the parser refuses, or a document whose
//! operation cannot be picked, is `None`: it goes upstream unshared, and
//! the server answers it with its own error.

use graphql_parser::query::{Definition, OperationDefinition};

/// The type of a GraphQL operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Query,
    Mutation,
    Subscription,
}

/// The type of the operation `name` selects in `document` (the one
/// operation, when `name` is None), as a GraphQL server picks it.
pub fn operation_kind(document: &str, name: Option<&str>) -> Option<Kind> {
    let doc = graphql_parser::parse_query::<&str>(document).ok()?;
    let mut ops = doc.definitions.iter().filter_map(|def| match def {
        Definition::Operation(op) => Some(match op {
            OperationDefinition::SelectionSet(_) => (None, Kind::Query),
            OperationDefinition::Query(q) => (q.name, Kind::Query),
            OperationDefinition::Mutation(m) => (m.name, Kind::Mutation),
            OperationDefinition::Subscription(s) => (s.name, Kind::Subscription),
        }),
        Definition::Fragment(_) => None,
    });
    match name {
        Some(name) => ops.find(|(n, _)| *n == Some(name)).map(|(_, k)| k),
        None => {
            let (_, kind) = ops.next()?;
            // More than one operation and no name: the server refuses it.
            ops.next().is_none().then_some(kind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selected_operation_s_type_is_found() {
        let doc = "query A { a } subscription B { b } fragment F on T { x } mutation C { c }";
        assert_eq!(operation_kind(doc, Some("A")), Some(Kind::Query));
        assert_eq!(operation_kind(doc, Some("B")), Some(Kind::Subscription));
        assert_eq!(operation_kind(doc, Some("C")), Some(Kind::Mutation));
        assert_eq!(operation_kind(doc, Some("D")), None, "no such operation");
        assert_eq!(operation_kind(doc, None), None, "which one?");
        assert_eq!(operation_kind("{ a }", None), Some(Kind::Query));
        assert_eq!(
            operation_kind("subscription { ticks }", None),
            Some(Kind::Subscription)
        );
        assert_eq!(operation_kind("subscription {", None), None, "not GraphQL");
        // A string that spells a keyword is not one.
        let tricky = "query Q { search(text: \"subscription\") }";
        assert_eq!(operation_kind(tricky, None), Some(Kind::Query));
    }
}
