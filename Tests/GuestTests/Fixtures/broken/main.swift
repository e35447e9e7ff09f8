// Does not compile: the builder must report swiftc's error.
let x: Int = "not a number"
