//! The replication's 10 instruction prompts, with hidden tests so they can be graded by
//! execution.
//!
//! The popular small-scale replication of "Textbooks Are All You Need" (phi-1.5 fine-tuned with
//! QLoRA on CodeAlpaca vs codeparrot data) compared the two models by eyeballing their answers
//! to about ten simple instruction prompts such as "a function that finds the largest number in
//! a list" and "a palindrome check". Its exact wording could not be found (searched public code
//! and web pages), so the prompts below are written in that style by us; they are not the
//! original text. Each names the function (`entry_point`) the hidden tests call, so that an
//! answer can be graded automatically rather than by eye.
//!
//! Each prompt is rendered through an instruction template (a string with `{instruction}`; see
//! [`super::DEFAULT_INSTRUCTION_TEMPLATE`]). The answer is graded as a standalone program:
//! `code_prefix` is empty, so the program is `completion + "\n" + test`.

use super::{EvalKind, EvalProblem, EvalSetError};

/// Stop sequences for instruction answers: the start of a new instruction block.
pub const REPLICATION_STOP_SEQUENCES: [&str; 2] = ["\n### Instruction", "\n### Response"];

/// One replication prompt: `(id, instruction, entry_point, hidden test body, reference answer)`.
///
/// The test body is the inside of `check(candidate)`; asserts call `candidate`.
pub const REPLICATION_PROMPTS: [(&str, &str, &str, &str, &str); 10] = [
    (
        "largest_number",
        "Write a Python function `find_largest(numbers)` that finds the largest number in a list.",
        "find_largest",
        "assert candidate([3, 7, 2, 9, 4]) == 9
    assert candidate([-5, -2, -11]) == -2
    assert candidate([42]) == 42
    assert candidate([1.5, 0.25, 1.75]) == 1.75
    assert candidate([7, 7, 3]) == 7",
        "def find_largest(numbers):
    largest = numbers[0]
    for n in numbers[1:]:
        if n > largest:
            largest = n
    return largest
",
    ),
    (
        "palindrome",
        "Write a Python function `is_palindrome(s)` that checks whether a string is a palindrome \
         and returns True or False.",
        "is_palindrome",
        "assert candidate('racecar') is True
    assert candidate('abba') is True
    assert candidate('hello') is False
    assert candidate('a') is True
    assert candidate('ab') is False",
        "def is_palindrome(s):
    return s == s[::-1]
",
    ),
    (
        "factorial",
        "Write a Python function `factorial(n)` that returns the factorial of a non-negative \
         integer n.",
        "factorial",
        "assert candidate(0) == 1
    assert candidate(1) == 1
    assert candidate(5) == 120
    assert candidate(10) == 3628800",
        "def factorial(n):
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result
",
    ),
    (
        "fibonacci",
        "Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number, where \
         fibonacci(0) is 0 and fibonacci(1) is 1.",
        "fibonacci",
        "assert candidate(0) == 0
    assert candidate(1) == 1
    assert candidate(2) == 1
    assert candidate(10) == 55
    assert candidate(20) == 6765",
        "def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
",
    ),
    (
        "reverse_string",
        "Write a Python function `reverse_string(s)` that reverses a string.",
        "reverse_string",
        "assert candidate('hello') == 'olleh'
    assert candidate('') == ''
    assert candidate('a') == 'a'
    assert candidate('Python 3') == '3 nohtyP'",
        "def reverse_string(s):
    return s[::-1]
",
    ),
    (
        "count_vowels",
        "Write a Python function `count_vowels(s)` that counts the vowels (a, e, i, o, u, in \
         upper or lower case) in a string.",
        "count_vowels",
        "assert candidate('hello world') == 3
    assert candidate('AEIOU') == 5
    assert candidate('rhythm') == 0
    assert candidate('') == 0
    assert candidate('Programming') == 3",
        "def count_vowels(s):
    return sum(1 for c in s.lower() if c in 'aeiou')
",
    ),
    (
        "prime_check",
        "Write a Python function `is_prime(n)` that checks whether an integer is a prime number \
         and returns True or False.",
        "is_prime",
        "assert candidate(2) is True
    assert candidate(17) is True
    assert candidate(97) is True
    assert candidate(1) is False
    assert candidate(0) is False
    assert candidate(21) is False
    assert candidate(25) is False",
        "def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True
",
    ),
    (
        "sum_even",
        "Write a Python function `sum_even(numbers)` that returns the sum of the even numbers in \
         a list.",
        "sum_even",
        "assert candidate([1, 2, 3, 4, 5, 6]) == 12
    assert candidate([1, 3, 5]) == 0
    assert candidate([]) == 0
    assert candidate([-2, 4, 7]) == 2",
        "def sum_even(numbers):
    return sum(n for n in numbers if n % 2 == 0)
",
    ),
    (
        "remove_duplicates",
        "Write a Python function `remove_duplicates(items)` that removes duplicates from a list, \
         keeping the first occurrence of each element in its original order.",
        "remove_duplicates",
        "assert candidate([1, 2, 2, 3, 1]) == [1, 2, 3]
    assert candidate([]) == []
    assert candidate(['b', 'a', 'b']) == ['b', 'a']
    assert candidate([5, 5, 5]) == [5]",
        "def remove_duplicates(items):
    seen = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result
",
    ),
    (
        "celsius_to_fahrenheit",
        "Write a Python function `celsius_to_fahrenheit(celsius)` that converts a temperature \
         from Celsius to Fahrenheit.",
        "celsius_to_fahrenheit",
        "assert abs(candidate(0) - 32) < 1e-9
    assert abs(candidate(100) - 212) < 1e-9
    assert abs(candidate(-40) - (-40)) < 1e-9
    assert abs(candidate(37.5) - 99.5) < 1e-9",
        "def celsius_to_fahrenheit(celsius):
    return celsius * 9 / 5 + 32
",
    ),
];

/// Puts `instruction` into `template` at its `{instruction}` placeholder.
pub fn render_instruction(template: &str, instruction: &str) -> Result<String, EvalSetError> {
    if !template.contains("{instruction}") {
        return Err(EvalSetError::TemplateWithoutPlaceholder(
            template.to_string(),
        ));
    }
    Ok(template.replace("{instruction}", instruction))
}

/// The 10 replication problems, prompts rendered through `template`.
pub fn replication_problems(template: &str) -> Result<Vec<EvalProblem>, EvalSetError> {
    REPLICATION_PROMPTS
        .iter()
        .map(|&(id, instruction, entry_point, body, reference)| {
            Ok(EvalProblem {
                task_id: format!("Replication/{id}"),
                prompt: render_instruction(template, instruction)?,
                code_prefix: String::new(),
                test: format!("\n\ndef check(candidate):\n    {body}\n\n\ncheck({entry_point})\n"),
                entry_point: entry_point.to_string(),
                kind: EvalKind::Replication,
                stop: REPLICATION_STOP_SEQUENCES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                canonical_solution: Some(reference.to_string()),
            })
        })
        .collect()
}
