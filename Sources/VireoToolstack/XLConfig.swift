/// A place in a configuration file, for messages: `file:line:column` (1-based).
public struct SourceLocation: Equatable, Sendable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int
    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }
    public var description: String { "\(file):\(line):\(column)" }
}

/// A configuration error, naming where it is and what is wrong.
public struct ConfigError: Error, Equatable, Sendable, CustomStringConvertible {
    public var location: SourceLocation
    public var message: String
    public init(_ location: SourceLocation, _ message: String) {
        self.location = location
        self.message = message
    }
    public var description: String { "\(location): \(message)" }
}

/// One value of an xl.cfg setting: a string (quoted), a number (kept as written, as xl does),
/// or a list of values. Every value remembers where it starts.
public indirect enum XLValue: Equatable, Sendable {
    case string(String, SourceLocation)
    case number(String, SourceLocation)
    case list([XLValue], SourceLocation)

    public var location: SourceLocation {
        switch self {
        case .string(_, let l), .number(_, let l), .list(_, let l): l
        }
    }

    /// What the value says to a reader: "a string", "a number", "a list".
    public var kind: String {
        switch self {
        case .string: "a string"
        case .number: "a number"
        case .list: "a list"
        }
    }
}

/// One `KEY = VALUE` (or `KEY += VALUE`) statement.
public struct XLSetting: Equatable, Sendable {
    public var key: String
    public var value: XLValue
    /// Where the key starts.
    public var location: SourceLocation
    /// `+=`: appended to an earlier list or string of the same key.
    public var appends: Bool
}

/// Xen's xl domain configuration syntax (xl.cfg(5)), read the way xl reads it: statements
/// `KEY = VALUE` separated by newlines or `;`; `#` comments to the end of the line; values are
/// strings in double or single quotes (with C escapes `\n \t \\ \" \' \xHH` and octal), numbers
/// (decimal or `0x` hex), or lists `[ VALUE, ... ]` that may span lines and end with a comma;
/// `KEY += VALUE` appends. A later `KEY =` replaces an earlier one.
public enum XLConfigParser {
    public static func parse(_ text: String, file: String) throws(ConfigError) -> [XLSetting] {
        var lexer = Lexer(bytes: Array(text.utf8), file: file)
        var settings: [XLSetting] = []
        while true {
            lexer.skipBlank(newlines: true, semicolons: true)
            guard let byte = lexer.peek() else { break }
            let start = lexer.location
            guard Lexer.isIdentifierStart(byte) else {
                throw ConfigError(start, "expected a setting name, found \(Lexer.describe(byte))")
            }
            let key = lexer.identifier()
            lexer.skipBlank(newlines: false, semicolons: false)
            var appends = false
            if lexer.peek() == UInt8(ascii: "+") {
                lexer.advance()
                appends = true
            }
            guard lexer.peek() == UInt8(ascii: "=") else {
                throw ConfigError(lexer.location, "expected '=' after '\(key)', found \(lexer.peek().map(Lexer.describe) ?? "the end of the file")")
            }
            lexer.advance()
            lexer.skipBlank(newlines: false, semicolons: false)
            let value = try lexer.value(for: key)
            lexer.skipBlank(newlines: false, semicolons: false)
            if let next = lexer.peek(), next != 10, next != UInt8(ascii: ";") {
                throw ConfigError(lexer.location, "expected the end of the '\(key)' setting, found \(Lexer.describe(next))")
            }
            settings.append(XLSetting(key: key, value: value, location: start, appends: appends))
        }
        return settings
    }

    struct Lexer {
        let bytes: [UInt8]
        let file: String
        var index = 0
        var line = 1
        var lineStart = 0

        var location: SourceLocation { SourceLocation(file: file, line: line, column: index - lineStart + 1) }

        func peek() -> UInt8? { index < bytes.count ? bytes[index] : nil }

        mutating func advance() {
            if bytes[index] == 10 {
                line += 1
                lineStart = index + 1
            }
            index += 1
        }

        static func isIdentifierStart(_ b: UInt8) -> Bool {
            (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || b == UInt8(ascii: "_")
        }
        static func isIdentifier(_ b: UInt8) -> Bool { isIdentifierStart(b) || (b >= 48 && b <= 57) }

        static func describe(_ b: UInt8) -> String {
            switch b {
            case 10: "a line break"
            case 32...126: "'\(String(UnicodeScalar(b)))'"
            default: "byte 0x\(String(b, radix: 16))"
            }
        }

        /// Spaces, tabs, carriage returns and comments; newlines and `;` when asked.
        mutating func skipBlank(newlines: Bool, semicolons: Bool) {
            while let b = peek() {
                if b == 32 || b == 9 || b == 13 {
                    advance()
                } else if b == UInt8(ascii: "#") {
                    while let c = peek(), c != 10 { advance() }
                } else if (newlines && b == 10) || (semicolons && b == UInt8(ascii: ";")) {
                    advance()
                } else {
                    return
                }
            }
        }

        mutating func identifier() -> String {
            let start = index
            while let b = peek(), Self.isIdentifier(b) { advance() }
            return String(decoding: bytes[start..<index], as: UTF8.self)
        }

        mutating func value(for key: String) throws(ConfigError) -> XLValue {
            let start = location
            guard let b = peek(), b != 10, b != UInt8(ascii: ";") else {
                throw ConfigError(start, "'\(key)' has no value")
            }
            switch b {
            case UInt8(ascii: "\""), UInt8(ascii: "'"):
                return .string(try string(quote: b), start)
            case UInt8(ascii: "["):
                advance()
                var items: [XLValue] = []
                while true {
                    skipBlank(newlines: true, semicolons: false)
                    guard let c = peek() else { throw ConfigError(start, "the list of '\(key)' is not closed with ']'") }
                    if c == UInt8(ascii: "]") {
                        advance()
                        return .list(items, start)
                    }
                    items.append(try value(for: key))
                    skipBlank(newlines: true, semicolons: false)
                    if peek() == nil {
                        throw ConfigError(start, "the list of '\(key)' is not closed with ']'")
                    } else if peek() == UInt8(ascii: ",") {
                        advance()
                    } else if peek() != UInt8(ascii: "]") {
                        throw ConfigError(location, "expected ',' or ']' in the list of '\(key)', found \(peek().map(Self.describe) ?? "the end of the file")")
                    }
                }
            case 48...57:
                let begin = index
                while let c = peek(), Self.isIdentifier(c) { advance() }
                let text = String(decoding: bytes[begin..<index], as: UTF8.self)
                let hex = text.hasPrefix("0x") || text.hasPrefix("0X")
                let digits = hex ? text.dropFirst(2) : Substring(text)
                guard !digits.isEmpty, UInt64(digits, radix: hex ? 16 : 10) != nil else {
                    throw ConfigError(start, "'\(text)' is not a number (decimal or 0x hex)")
                }
                return .number(text, start)
            default:
                throw ConfigError(start, "expected a value for '\(key)' (a quoted string, a number or a [list]), found \(Self.describe(b))")
            }
        }

        mutating func string(quote: UInt8) throws(ConfigError) -> String {
            let start = location
            advance()
            var out: [UInt8] = []
            while true {
                guard let b = peek(), b != 10 else { throw ConfigError(start, "the string is not closed on its line") }
                advance()
                if b == quote { return String(decoding: out, as: UTF8.self) }
                guard b == UInt8(ascii: "\\") else {
                    out.append(b)
                    continue
                }
                let escape = location
                guard let e = peek(), e != 10 else { throw ConfigError(escape, "a backslash ends the line inside a string") }
                advance()
                switch e {
                case UInt8(ascii: "n"): out.append(10)
                case UInt8(ascii: "t"): out.append(9)
                case UInt8(ascii: "r"): out.append(13)
                case UInt8(ascii: "\\"), UInt8(ascii: "\""), UInt8(ascii: "'"): out.append(e)
                case UInt8(ascii: "x"):
                    var value = 0, count = 0
                    while count < 2, let h = peek(), let d = Self.hexDigit(h) {
                        value = value * 16 + d
                        count += 1
                        advance()
                    }
                    guard count > 0 else { throw ConfigError(escape, "'\\x' needs hex digits") }
                    out.append(UInt8(value))
                case 48...55:
                    var value = Int(e - 48), count = 1
                    while count < 3, let o = peek(), o >= 48 && o <= 55 {
                        value = value * 8 + Int(o - 48)
                        count += 1
                        advance()
                    }
                    guard value <= 255 else { throw ConfigError(escape, "octal escape beyond 255") }
                    out.append(UInt8(value))
                default:
                    throw ConfigError(escape, "unknown escape '\\\(String(UnicodeScalar(e)))' in a string")
                }
            }
        }

        static func hexDigit(_ b: UInt8) -> Int? {
            switch b {
            case 48...57: Int(b - 48)
            case 97...102: Int(b - 87)
            case 65...70: Int(b - 55)
            default: nil
            }
        }
    }
}
